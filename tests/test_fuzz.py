"""The fuzzer, told nothing but a backend's declaration and a check, finds every mutant and shrinks the
failure to a small case whose id reruns it; correct backends survive it."""

import collections
import dataclasses

import pytest
from hypothesis import HealthCheck, Phase, find, given, settings

from conformance import features, fuzz, grid
from conformance.backends import tiled
from conformance.capabilities import Capabilities
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


def test_given_variants_are_the_only_ones_drawn_each_with_sizes_of_its_own():
    """A compiled backend's fuzz test is given the variants its grid compiles (scheduling.family: dtype, head
    dim, layout, GQA or not, masked or not, scale, features): only those are drawn, each reached, with
    batch, seqlens, heads and values drawn anew; drawn freely, most cases are a variant of their own."""
    from conformance.scheduling import family

    caps = tiled.BACKEND.capabilities.updated({"head_dim_min": 16, "head_dim_max": 160})
    variants = (Case(dtype="fp16", head_dim=64, causal="bottom_right", layout="packed"),
                Case(dtype="bf16", head_dim=40, nheads=4, nheads_k=2, softmax_scale=0.3, layout="bhsd"),
                Case(dtype="fp32", head_dim=128, softcap=5.0, window=(3, -1)))
    drawn = {"given": [], "free": []}
    for kind in drawn:
        values = dict(variants=variants) if kind == "given" else {}

        @settings(max_examples=60, derandomize=True, database=None)
        @given(case=fuzz.cases(caps, "cpu", (), None, **values))
        def record(case):
            drawn[kind].append(case)

        record()
    families = {family(c) for c in drawn["given"]}
    assert families == {family(v) for v in variants}  # those only, and each reached
    assert {c.softmax_scale for c in drawn["given"]} == {v.softmax_scale for v in variants}  # the values, too
    assert len({(c.batch, c.seqlen_q, c.seqlen_k, c.nheads, c.nheads_k) for c in drawn["given"]}) > 20
    assert len({c.window for c in drawn["given"]}) > 3 and len({c.seed for c in drawn["given"]}) > 10
    assert sum(family(c) not in families for c in drawn["free"]) > 40


def test_a_compiled_backends_fuzz_variants_are_its_checks_grid_variants_at_the_tier():
    """Each variant is a compilation: the fuzz test of a check draws its grid's, tier by tier, one case of
    each (a paged cache with its page size, a bias with its kind and pattern, a mixed batch or not), and
    what it draws from them stays in them for every check flex is fuzzed on."""
    from conformance.backends.flex import BACKEND as flex
    from conformance.scheduling import family

    for tier in ("quick", "standard"):
        for name, check in CHECKS.items():
            variants = fuzz.grid_variants(check, flex.capabilities, "cuda", tier)
            if check.intents is None:
                assert variants == ()
                continue
            grid_families = {family(r.case) for r in grid.for_backend(check, flex.capabilities, "cuda", tier) if r.case}
            assert [family(v) for v in variants] == list(dict.fromkeys(family(v) for v in variants))  # one each
            assert {family(v) for v in variants} == grid_families
            if fuzz.not_fuzzable_reasons(flex.capabilities, check.needs, check.feature) or not variants:
                continue

            @settings(max_examples=25, derandomize=True, database=None, deadline=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=fuzz.cases(flex.capabilities, "cuda", check.needs, check.feature, variants=variants))
            def inside(case):
                assert family(case) in grid_families, (tier, name, case.id)

            inside()
    assert len(fuzz.grid_variants(CHECKS["causal"], flex.capabilities, "cuda", "quick")) == 3
    assert len(fuzz.grid_variants(CHECKS["causal"], flex.capabilities, "cuda", "standard")) == 21
    assert fuzz.grid_variants(CHECKS["softcap"], tiled.BACKEND.capabilities.updated({"softcap": False}), "cpu",
                              "standard") == ()  # no grid: nothing to draw from (and the check is not fuzzable)


# tiled's declaration (paged and mixed KV-cache batches), fuzzed as a compiled backend's: its grid's KV-cache variants
KVCACHE_CAPS = tiled.BACKEND.capabilities
KVCACHE_VARIANTS = fuzz.grid_variants(CHECKS["kvcache"], KVCACHE_CAPS, "cpu", "quick")


def _kvcache_draws(caps, variants=(), max_examples=25):
    drawn = []

    @settings(max_examples=max_examples, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(case=fuzz.cases(caps, "cpu", CHECKS["kvcache"].needs, "kvcache", variants=variants))
    def record(case):
        drawn.append(case)

    record()
    return drawn


def test_a_kvcache_variant_draws_its_page_size_and_mixed_batch_once(monkeypatch):
    """The KV-cache feature's draw draws the page size and the mixed batch: their own rows are not drawn again
    (the second draw would win, the first wasted)."""
    draws, in_cache = collections.Counter(), []

    def counted(name, draw):
        def counting(*args):
            draws[name, "in the cache's draw" if in_cache else "again"] += 1
            draw(*args)
        return counting

    def cache_draw(*args):
        in_cache.append(True)
        try:
            features._draw_cache(*args)
        finally:
            in_cache.pop()

    # the rows' draws, and the page's and the mixed batch's as the KV cache's draw calls them
    monkeypatch.setattr(features, "FEATURES", tuple(
        dataclasses.replace(f, draw=cache_draw if f.name == "kvcache" else counted(f.name, f.draw))
        for f in features.FEATURES))
    monkeypatch.setattr(features, "_draw_page", counted("paged_kv", features._draw_page))
    monkeypatch.setattr(features, "_draw_mixed", counted("mixed_batch", features._draw_mixed))
    variants = tuple(v for v in KVCACHE_VARIANTS if v.page_block is not None and v.new_seqlens is not None)
    assert variants and _kvcache_draws(KVCACHE_CAPS, variants)
    assert {kind for _, kind in draws} == {"in the cache's draw"}, draws
    assert {name for name, _ in draws} == {"paged_kv", "mixed_batch"}


def test_a_kvcache_variants_cases_keep_its_mixed_batch_and_page_size():
    """A mixed prefill and decode variant stays mixed and one that is not stays not, each with its page size
    (or none): a case that changed either would be another variant, a compilation of its own."""
    kinds = {(v.new_seqlens is not None, v.page_block) for v in KVCACHE_VARIANTS}
    assert {(True, None), (False, None)} <= kinds and {mixed for mixed, page in kinds if page} == {True, False}
    for variant in KVCACHE_VARIANTS:
        for case in _kvcache_draws(KVCACHE_CAPS, (variant,), max_examples=10):
            assert (case.new_seqlens is None) == (variant.new_seqlens is None), (variant.id, case.id)
            assert case.page_block == variant.page_block, (variant.id, case.id)


@pytest.mark.parametrize("multiple", (16, 3))
def test_kvcache_cases_are_drawn_for_a_backend_with_a_seqlen_multiple(multiple):
    """The KV cache's 1 to 8 new tokens are no multiple of 16: they are rounded as the grid rounds lengths, the
    cache with them (paged and mixed batches too), rather than every draw filtered out."""
    caps = Capabilities(kvcache=True, paged_kv=True, mixed_batch=True, seqlen_multiple=multiple)
    variants = fuzz.grid_variants(CHECKS["kvcache"], caps, "cpu", "quick")
    drawn = _kvcache_draws(caps, max_examples=20) + _kvcache_draws(caps, variants, max_examples=20)
    assert len(drawn) == 40
    for case in drawn:
        assert not caps.not_supported_reasons(case, "cpu", CHECKS["kvcache"].needs), case.id
        assert case.seqlen_q % multiple == 0 and case.seqlen_k % multiple == 0, case.id
    assert any(c.page_block for c in drawn) and any(c.new_seqlens for c in drawn)


def test_a_mixed_batchs_decode_cache_stays_longer_than_the_prefills_when_rounded_to_a_multiple():
    """The prefill's new tokens rounded up to the multiple, the other items' caches grow by as many: the
    decode still reads a cache longer than the prefill's with its tokens (_draw_mixed's intent)."""
    fields = dict(batch=2, seqlen_q=4, seqlen_k=40, cache_seqlens=(10, 14), new_seqlens=(4, 1))
    fuzz._cache_in_multiple(fields, 16)
    assert fields == dict(batch=2, seqlen_q=16, seqlen_k=64, cache_seqlens=(10, 26), new_seqlens=(16, 1))
    assert Case(head_dim=16, **fields).id  # a valid case
