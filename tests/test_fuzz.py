"""The fuzzer, told nothing but a backend's declaration and a check, finds every mutant and shrinks the
failure to a small case whose id reruns it; correct backends survive it."""

import pytest
from hypothesis import HealthCheck, Phase, find, given, settings

from conformance import fuzz, grid
from conformance.backends import tiled
from conformance.case import Case
from conformance.checks import CHECKS, CORRECTNESS_CHECKS, execute
from mutants import MUTANTS

# The budget real runs use (--fuzz=ci): tools/fuzz_budget.py measures it over random seeds.
SEARCH = settings(fuzz.profile("ci"), database=None, phases=[Phase.generate])


def strategy(backend, check):
    module = CHECKS[check]
    return fuzz.cases(backend.capabilities, "cpu", module.needs, module.feature)


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m.backend.name)
def test_fuzzer_finds_each_mutant(mutant):
    def caught(case):
        return mutant.prop in execute(mutant.check, mutant.backend, case, "cpu").failed_properties

    found = find(strategy(mutant.backend, mutant.check), caught, settings=SEARCH)
    assert Case.from_id(found.id) == found and caught(found)


def test_the_default_budget_is_the_documented_one():
    assert fuzz.PROFILES["ci"]["max_examples"] == 25


def test_a_failure_shrinks_to_a_minimal_case():
    mutant = next(m for m in MUTANTS if m.backend.name == "batch-mixed")

    def caught(case):
        return mutant.prop in execute(mutant.check, mutant.backend, case, "cpu").failed_properties

    minimal = find(strategy(mutant.backend, mutant.check), caught,
                   settings=settings(SEARCH, phases=[Phase.generate, Phase.shrink]))
    print("minimal failing case:", minimal.id)
    assert minimal.batch == 2 and minimal.seqlen_q == minimal.seqlen_k == 1 and minimal.nheads == 1


@pytest.mark.parametrize("check", CORRECTNESS_CHECKS)
def test_correct_backend_survives_fuzzing(check):
    @settings(max_examples=25, derandomize=True, deadline=None, database=None)
    @given(case=strategy(tiled.BACKEND, check))
    def survives(case):
        verdict = execute(check, tiled.BACKEND, case, "cpu")
        assert verdict.passed, verdict.message()

    survives()


def test_fuzzed_cases_stay_inside_the_declaration():
    caps = tiled.BACKEND.capabilities.updated({"dtypes": ["bf16"], "head_dims": [64, 128], "causal": ["top_left"],
                                               "gqa": False, "mqa": False, "equal_seqlens": True})

    @settings(max_examples=50, derandomize=True, database=None)
    @given(case=fuzz.cases(caps, "cpu", ("backward",), "causal"))
    def inside(case):
        # stated field by field, not through not_supported_reasons (the filter the strategy itself applies)
        assert case.dtype == "bf16" and case.head_dim in (64, 128) and case.causal == "top_left"
        assert case.seqlen_q == case.seqlen_k and case.nheads == case.nheads_k

    inside()


def test_given_head_dims_and_scales_are_the_only_ones_drawn():
    """A compiled backend's fuzz test is given the head dims and scales its grid compiles: only those are drawn."""
    caps = tiled.BACKEND.capabilities.updated({"head_dim_min": 16, "head_dim_max": 160})
    head_dims, scales = (64, 128, 40), (None, 0.3)
    drawn = {"given": set(), "free": set()}
    for kind in drawn:
        values = dict(head_dims=head_dims, scales=scales) if kind == "given" else {}

        @settings(max_examples=60, derandomize=True, database=None)
        @given(case=fuzz.cases(caps, "cpu", (), "causal", **values))
        def record(case):
            drawn[kind].add((case.head_dim, case.softmax_scale))

        record()
    assert drawn["given"] == {(d, s) for d in head_dims for s in scales}  # those only, and each reached
    assert len({d for d, _ in drawn["free"]} - set(head_dims)) > 10  # drawn freely, most are neither


def test_a_compiled_backends_fuzz_values_are_what_its_checks_grid_realises_at_the_tier():
    """Each head dim and scale is a compilation: the fuzz test of a check reuses its grid's, tier by tier
    (the quick grid's causal check compiles head dim 64 and the default scale only; its forward check
    hand-written head dims and a custom scale)."""
    from conformance.backends.flex import BACKEND as flex

    def values(check, tier):
        return fuzz.grid_values(CHECKS[check], flex.capabilities, "cuda", tier)

    assert values("causal", "quick") == ((64,), (None,))
    assert values("causal", "standard") == ((40, 64, 128), (None, 0.3))
    dims, scales = values("forward", "quick")
    assert {40, 64, 128, 256} <= set(dims) and scales == (None, 0.3)
    assert fuzz.grid_values(CHECKS["softcap"], tiled.BACKEND.capabilities.updated({"softcap": False}), "cpu",
                            "standard") == (grid.head_dim_palette(tiled.BACKEND.capabilities), grid.SCALES)  # no grid: the palette
