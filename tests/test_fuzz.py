"""The fuzzer, told nothing but a backend's declaration and a check, finds every mutant and shrinks the
failure to a small case whose id reruns it; correct backends survive it."""

import pytest
from hypothesis import HealthCheck, Phase, find, given, settings

from conformance import fuzz
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


def test_a_compiled_backend_is_fuzzed_on_the_grids_head_dims_and_scales_only():
    """Each head dim and scale of a compiled kernel is a compilation: its fuzz test reuses the grid's."""
    from conformance import grid

    caps = tiled.BACKEND.capabilities.updated({"head_dim_min": 16, "head_dim_max": 160})
    palette = grid.head_dim_palette(caps)
    assert palette == (64, 128, 40)
    drawn = {"compiled": set(), "plain": set()}
    for kind in drawn:
        @settings(max_examples=60, derandomize=True, database=None)
        @given(case=fuzz.cases(caps, "cpu", (), "causal", compiled=kind == "compiled"))
        def record(case):
            drawn[kind].add((case.head_dim, case.softmax_scale))

        record()
    assert {d for d, _ in drawn["compiled"]} <= set(palette) and {s for _, s in drawn["compiled"]} <= set(grid.SCALES)
    assert {d for d, _ in drawn["compiled"]} == set(palette)  # every palette value is reached
    assert len({d for d, _ in drawn["plain"]} - set(palette)) > 10  # a plain backend's are not so limited


def test_a_compiled_backends_quick_tier_fuzz_test_draws_only_what_the_quick_grid_compiles():
    """The quick grid compiles the first palette head dim and the default scale only: so does its fuzz test."""
    from conformance import grid, tiers

    caps = tiled.BACKEND.capabilities.updated({"head_dim_min": 16, "head_dim_max": 160})
    quick = grid.factors(caps, "cpu", tiers.level("quick"))
    assert quick["head_dim"] == (64,) and quick["scale"] == (None,)
    drawn = set()

    @settings(max_examples=40, derandomize=True, database=None)
    @given(case=fuzz.cases(caps, "cpu", (), "causal", compiled=True, level=tiers.level("quick")))
    def record(case):
        drawn.add((case.head_dim, case.softmax_scale))

    record()
    assert drawn == {(64, None)}
