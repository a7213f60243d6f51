"""The fuzz test through pytest: its profiles registered with hypothesis, a failure shown as the kernel's
finding (no traceback through this suite), the minimal failing case saved per backend × check and
replayed first by the next run, in every profile, and dropped once it passes."""

import dataclasses
from types import SimpleNamespace

import hypothesis
import pytest
from hypothesis import settings
from hypothesis import strategies as st

from conformance import fuzz, fuzz_driver
from conformance.backends.naive import BACKEND
from conformance.case import Case
from conformance.checks import CHECKS
from conformance.isolation import CaseResult
from conformance.outcomes import Outcome

SUITE = ("--pyargs", "conformance.suite", "-p", "no:cacheprovider", "--tier=quick", "--check=fuzz", "-k", "forward",
         "--backend=kernel.py:attention")

KERNEL = '''
import torch

def attention(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = q @ k.transpose(-1, -2) * SCALE
    if causal:
        sq, sk = s.shape[-2:]
        s = s.masked_fill(~torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq), float("-inf"))
    return (torch.softmax(s, -1).nan_to_num(0.0) @ v).transpose(1, 2)

attention.conformance_capabilities = {"dtypes": ["fp32"], "backward": False}
'''
IGNORES_SCALE = KERNEL.replace("SCALE", "q.shape[-1] ** -0.5")
CORRECT = KERNEL.replace("SCALE", "(softmax_scale or q.shape[-1] ** -0.5)")


def stub_session(run, failure_text=lambda *a: None, tier="standard"):
    """What fuzz_check asks of the session, on the CPU with the ci profile at ``tier``: ``run`` judges a case."""
    return SimpleNamespace(selection=SimpleNamespace(device="cpu", tier=tier), fuzz_profile="ci",
                           given_up_on=lambda backend, case=None: False, failure_text=failure_text, run=run)


def test_profiles_are_registered_and_selectable():
    for name, values in fuzz.PROFILES.items():
        registered = settings.get_profile(f"conformance-{name}")
        assert registered.max_examples == values["max_examples"] and registered.database is None
        assert registered.print_blob is False and registered.deadline is None
    before = settings.get_current_profile_name()
    try:
        assert fuzz_driver.profile_name("ci") == "conformance-ci"  # a project's own profile does not count
        settings.load_profile("conformance-thorough")
        assert fuzz_driver.profile_name("ci") == "conformance-thorough"
    finally:
        settings.load_profile(before)


def test_one_replay_file_per_backend_and_check(tmp_path):
    files = {fuzz_driver.replay_file(b, c, tmp_path) for b in ("naive", "k.py:f", "k.py/f") for c in ("forward", "causal")}
    assert len(files) == 6
    assert fuzz_driver.replay_file("naive", "forward", tmp_path).name == "naive--forward.txt"


def test_failure_is_the_kernels_finding_saved_replayed_and_dropped_once_fixed(pytester):
    pytester.makepyfile(kernel=IGNORES_SCALE)
    result = pytester.runpytest_subprocess(*SUITE)
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "forward check failed for backend 'kernel.py:attention' on case" in out and "rerun: pytest" in out
    assert "Traceback" not in out and "fuzz_driver.py" not in out and "During handling" not in out
    assert "@reproduce_failure" not in out and "(fuzz profile conformance-ci)" in out
    (saved,) = (pytester.path / ".hypothesis" / "conformance").glob("kernel.py_attention-*--forward.txt")
    (case_id,) = saved.read_text().split()
    assert f"--case={case_id}" in out

    # the next run, in another profile, replays it first: the same case fails again
    result = pytester.runpytest_subprocess(*SUITE, "--hypothesis-profile=conformance-dev")
    result.assert_outcomes(failed=1)
    assert f"--case={case_id}" in result.stdout.str()
    assert "(fuzz profile conformance-dev; 1 case(s) saved by an earlier run failed again)" in result.stdout.str()

    pytester.makepyfile(kernel=CORRECT)
    pytester.runpytest_subprocess(*SUITE).assert_outcomes(passed=1)
    assert not saved.exists()


def test_a_case_drawn_twice_is_judged_once(monkeypatch, tmp_path):
    two = [Case(batch=1, seqlen_q=8, seqlen_k=8, nheads=1, head_dim=8, dtype="fp32", seed=s) for s in (1, 2)]
    monkeypatch.setattr(fuzz, "cases", lambda *a, **k: st.integers(0, 1000).map(lambda i: two[i % 2]))
    runs = []
    session = stub_session(lambda check, backend, case: runs.append(case.id) or CaseResult(Outcome.PASSED))
    fuzz_driver.fuzz_check(session, BACKEND, "forward", {}, tmp_path)
    assert sorted(runs) == sorted(c.id for c in two)  # 25 draws of two cases: each run once


def test_a_compiled_backend_is_fuzzed_with_the_variants_its_checks_grid_compiles(tmp_path):
    """A compiled backend compiles a kernel per variant (scheduling.family): the driver draws the variants its
    check's grid realises at the run's tier (fuzz.grid_variants), which the grid compiles anyway (drawn
    freely, most would be a compilation each); a backend that does not compile is fuzzed freely."""
    from conformance.scheduling import family

    compiled = dataclasses.replace(BACKEND, compiled=True)
    for tier, backend in (("standard", compiled), ("quick", compiled), ("standard", BACKEND)):
        runs = []
        session = stub_session(lambda check, b, case: runs.append(case) or CaseResult(Outcome.PASSED), tier=tier)
        fuzz_driver.fuzz_check(session, backend, "causal", {}, tmp_path)
        assert len(runs) > 10
        families = {family(c) for c in fuzz.grid_variants(CHECKS["causal"], BACKEND.capabilities, "cpu", tier)}
        outside = [c.id for c in runs if family(c) not in families]
        if backend.compiled:
            assert outside == [], (tier, outside)
        else:
            assert len(outside) > 5
    assert len(families) > len({family(c) for c in fuzz.grid_variants(CHECKS["causal"], BACKEND.capabilities, "cpu",
                                                                     "quick")})


def test_derandomized_draws_depend_on_the_check_not_on_the_drivers_source(monkeypatch, tmp_path):
    """Hypothesis seeds a derandomized test from its function's source: the driver's own, so any edit of
    it changed every CI run's draws. The ci profile's draws are those of the check's seed, as any
    function of the same strategy draws them."""
    strategy = st.integers(0, 10**6).map(
        lambda i: Case(batch=1, seqlen_q=8, seqlen_k=8, nheads=1, head_dim=8, dtype="fp32", seed=i))
    monkeypatch.setattr(fuzz, "cases", lambda *a, **k: strategy)
    runs = []
    session = stub_session(lambda check, backend, case: runs.append(case.id) or CaseResult(Outcome.PASSED))
    fuzz_driver.fuzz_check(session, BACKEND, "forward", {}, tmp_path)

    drawn = []

    @hypothesis.seed(fuzz_driver.draw_seed("forward"))
    @settings(settings.get_profile("conformance-ci"))
    @hypothesis.given(case=strategy)
    def elsewhere(case):
        drawn.append(case.id)

    elsewhere()
    assert len(set(runs)) > 10 and sorted(set(runs)) == sorted(set(drawn))
    assert fuzz_driver.draw_seed("forward") != fuzz_driver.draw_seed("gradients")


def test_shrinking_runs_new_cases_for_a_bounded_time(monkeypatch, tmp_path):
    """Each new case of a compiled kernel compiles: hypothesis' shrinking runs new cases only within
    SHRINK_SECONDS of the first failure, and the case reported is the smallest failing one found by then
    (one that was run and failed); a fast kernel shrinks to the end."""
    # every case fails; eight numbers to shrink make hypothesis try many smaller ones
    def case(numbers):
        return Case(batch=1, seqlen_q=8, seqlen_k=8, nheads=1, head_dim=8, dtype="fp32", seed=sum(numbers))

    monkeypatch.setattr(fuzz, "cases", lambda *a, **k: st.tuples(*[st.integers(0, 10**6)] * 8).map(case))
    runs = []
    session = stub_session(lambda check, backend, case: runs.append(case) or CaseResult(Outcome.FAILED),
                           failure_text=lambda *a: "it fails")
    for seconds in (60, 0):
        monkeypatch.setattr(fuzz_driver, "SHRINK_SECONDS", seconds)
        runs.clear()
        learnt = {}
        with pytest.raises(pytest.fail.Exception, match="it fails"):  # a folder each: no case replayed
            fuzz_driver.fuzz_check(session, BACKEND, "forward", learnt, tmp_path / str(seconds))
        assert learnt["case"] in runs
        if seconds:  # shrunk to the end: the smallest seed
            assert len(runs) > 20 and learnt["case"].seed == 0
        else:  # no time to shrink: the first failing case is the one reported
            assert runs == [learnt["case"]]


def test_a_compiled_backend_whose_grid_realises_no_variant_is_not_fuzzed_freely(tmp_path):
    """Drawn freely, each case of a compiled backend is a compilation of its own: where the check's grid realises
    no variant at the tier (a backend declaring equal seqlens only, attn_bias at the quick tier), it is not fuzzed."""
    compiled = dataclasses.replace(BACKEND, compiled=True,
                                   capabilities=BACKEND.capabilities.updated({"equal_seqlens": True}))
    assert fuzz.grid_variants(CHECKS["attn_bias"], compiled.capabilities, "cpu", "quick") == ()
    runs = []
    session = stub_session(lambda check, b, case: runs.append(case) or CaseResult(Outcome.PASSED), tier="quick")
    with pytest.raises(fuzz_driver.NotFuzzable, match="no variant"):
        fuzz_driver.fuzz_check(session, compiled, "attn_bias", {}, tmp_path)
    assert runs == []


def test_a_compiled_backend_with_top_left_causal_only_is_fuzzed_on_its_kv_cache_variants(tmp_path):
    """The KV-cache draws take bottom-right alignments only; a compiled backend declaring top-left alone has causal
    KV-cache variants in its grid all the same, drawn with the variant's own alignment (not from an empty list)."""
    compiled = dataclasses.replace(BACKEND, compiled=True, capabilities=BACKEND.capabilities.updated({"causal": ["top_left"]}))
    runs = []
    session = stub_session(lambda check, b, case: runs.append(case) or CaseResult(Outcome.PASSED), tier="quick")
    fuzz_driver.fuzz_check(session, compiled, "kvcache", {}, tmp_path)
    assert len(runs) > 10 and "top_left" in {c.causal for c in runs}
