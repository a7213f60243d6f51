"""The diagnosis (conformance/diagnosis.py): each hypothesis names the planted bug it fits, and no
planted bug gets a hypothesis it does not fit; it runs only on failures, once per case."""

import pytest
import torch

from conformance import diagnosis
from conformance.backends import naive
from conformance.case import Case
from conformance.checks import CHECKS, execute
from conformance.inputs import make_inputs
from conformance.reference import attention
from conformance.verdict import Verdict
from mutants import DIAGNOSIS_MUTANTS, MUTANTS

# mutant -> (the check whose quick grid shows it, the start of the diagnosis it must get)
NAMED = {
    "scale-forgotten": ("forward", "softmax scale not applied"),
    "wrong-scale": ("forward", "softmax scale applied twice"),
    "scale-inverted": ("forward", "softmax scale inverted"),
    "scale-ignored": ("forward", "softmax_scale argument ignored"),
    "reads-bhsd": ("forward", "layout transposed"),
    "stride-bug": ("forward", "strides ignored"),
    "alignment-confused": ("causal", "causal alignment swapped (top-left used for bottom-right)"),
    "causal-dropped": ("causal", "causal mask missing"),
    "causal-always": ("forward", "causal mask applied when not asked"),
    "nan-masked-rows": ("causal", "fully masked rows hold NaN (declared: zeros)"),
    "mean-v-masked-rows": ("causal", "fully masked rows hold the mean of V (declared: zeros)"),
    "zeros-masked-rows": ("causal", "fully masked rows hold zeros (declared: the mean of V)"),
    "wrong-gqa-mapping": ("forward", "GQA head mapping"),
    "dropped-tail-block": ("forward", "dropped tail key block"),
    "batch-mixed": ("forward", "batch items mixed"),
    "gradient-off": ("gradients", "dk off by a constant factor"),
    "dropped-tail-rows": ("forward", "dropped tail query block (rows past the last full block wrong, holding zeros)"),
    "stale-tail-rows": ("forward", "dropped tail query block (rows past the last full block wrong, holding the "
                                   "answers of the rows 64 earlier)"),
    "no-max-subtraction": ("forward", "every row holds NaN"),
    "causal-leak": ("causal", "some query rows wrong"),
}
# true of the mutant too, though not what it was planted for
ALSO = {
    "no-max-subtraction": ("fully masked rows hold NaN",),  # exp(-1e9) sums to 0: 0/0
    "modifies-input": ("dq off by a constant factor",),  # q pre-scaled in place: its gradient is scaled
    "window-off-by-one": ("some query rows wrong",),  # the rows whose window reaches past the left edge
    "alibi-slope-sign": ("some query rows wrong",),  # the rows whose bias is 0 (one key) are right
    "scale-inverted": ("some query rows wrong",),  # a top-left causal row 0 sees one key: right
    "bool-mask-added": ("some query rows wrong",),  # the rows the causal mask leaves no key are right
}
ALL = MUTANTS + DIAGNOSIS_MUTANTS


def diagnoses(backend, checks):
    """(check, case id, diagnosis) of every finding on those checks' quick grids."""
    found = []
    for check in checks:
        module = CHECKS[check]
        for case in module.cases("quick"):
            if not backend.capabilities.not_supported_reasons(case, "cpu", module.needs):
                verdict = execute(check, backend, case, "cpu")
                found += [(check, case.id, f.diagnosis) for f in verdict.findings]
    return found


def test_every_hypothesis_is_proven_by_a_mutant():
    cases = (Case(batch=3, nheads=8, nheads_k=2, seqlen_q=130, seqlen_k=65, causal="bottom_right", softmax_scale=0.3,
                  layout="bhsd"), Case(seqlen_q=65, seqlen_k=65, layout="packed"), Case(seqlen_q=128, seqlen_k=64))
    labels = {h.label for case in cases for rows in ("zeros", "mean_v") for h in diagnosis.hypotheses(case, rows)}
    unproven = {label for label in labels
                if not any(named.startswith(label.split(" (declared")[0]) or label.startswith(named)
                           for _, named in NAMED.values())}
    assert len(labels) >= 14 and not unproven, f"hypotheses without a mutant: {unproven}"


@pytest.mark.parametrize("mutant", ALL, ids=lambda m: m.backend.name)
def test_mutant_gets_its_diagnosis_and_no_other(mutant):
    name = mutant.backend.name
    checks = dict.fromkeys([mutant.check, "forward", *([NAMED[name][0]] if name in NAMED else [])])
    found = diagnoses(mutant.backend, checks)
    allowed = ((NAMED[name][1],) if name in NAMED else ()) + ALSO.get(name, ())
    wrong = {(check, case, d) for check, case, d in found if d and not d.startswith(allowed)}
    assert not wrong, f"{name} was given diagnoses it does not fit: {sorted(wrong)}"
    if name in NAMED:
        check, label = NAMED[name]
        named = [case for c, case, d in found if c == check and d and d.startswith(label)]
        failed = [case for c, case, _ in found if c == check]
        assert named, f"{name}: no {check} failure was diagnosed {label!r} (failures: {failed})"


def test_detail_says_which_reference_the_output_equals():
    backend = next(m.backend for m in DIAGNOSIS_MUTANTS if m.backend.name == "scale-forgotten")
    verdict = execute("forward", backend, Case(), "cpu")
    (finding,) = verdict.findings
    assert finding.diagnosis == "softmax scale not applied (scores unscaled)"
    assert "EXCEEDS bound" in finding.message
    assert "your output equals the reference computed with softmax_scale=1.0" in finding.message
    record = verdict.as_dict()["findings"][0]
    assert record["diagnosis"] == finding.diagnosis
    assert Verdict.from_dict("forward", backend.name, Case(), "cpu", verdict.as_dict()).findings == verdict.findings


def test_a_hypothesis_is_named_only_when_it_stands_out():
    """Errors in units of the failed comparison's bound. Where two explain the output about as well (logits
    so large that any scale gives the same one-hot softmax: softcap-unscaled's bf16 case), neither."""
    one, two = (diagnosis.Hypothesis(name, "", None) for name in ("one", "two"))
    assert diagnosis._pick([(0.01, True, one), (40.0, True, two)], 50.0)[0] is one
    assert diagnosis._pick([(0.7, True, one), (0.97, True, two)], 3.8) is None  # ambiguous
    assert diagnosis._pick([(0.01, False, one), (40.0, True, two)], 50.0) is None  # NaN where it has none; 2 not close
    assert diagnosis._pick([(3.0, True, one), (40.0, True, two)], 100.0)[0] is one  # clearly best
    assert diagnosis._pick([(3.0, True, one), (40.0, True, two)], 30.0) is None  # not clearly closer than the case
    assert diagnosis._pick([(0.5, True, one)], 1.2) is None  # the case itself nearly passes


@pytest.mark.parametrize("fill, holds", [("zeros", "zeros"), ("nan", "NaN"), ("mean", "the mean of V")])
def test_wrong_rows_are_located_and_their_content_named(fill, holds):
    case = Case(seqlen_q=70, seqlen_k=70)
    inputs = make_inputs(case, "cpu")
    ref = attention(inputs.q, inputs.k, inputs.v, case)
    out = ref.clone()
    out[:, 10:20] = {"zeros": 0.0, "nan": float("nan"), "mean": inputs.v.double().mean(1, keepdim=True)}[fill]
    found = diagnosis.describe_rows(case, out, ref, inputs.v.double(), 1e-6)
    assert found.label == f"some query rows wrong, holding {holds}"
    assert "query rows 10..19 of 70" in found.detail


def test_no_diagnosis_for_a_passing_comparison_nor_twice_per_sanity_case(monkeypatch):
    calls = []
    real = diagnosis.diagnose_output
    monkeypatch.setattr(diagnosis, "diagnose_output", lambda *a: calls.append(a[0]) or real(*a))
    assert execute("forward", naive.BACKEND, Case(), "cpu").passed and not calls
    backend = next(m.backend for m in DIAGNOSIS_MUTANTS if m.backend.name == "scale-forgotten")
    verdict = execute("sanity", backend, Case(), "cpu")
    assert len(calls) == 1  # the first input set only, not the second
    (fresh,) = [f for f in verdict.findings if f.property == "fresh-output"]
    assert fresh.message.startswith("wrong on this input too (see the forward check)")
    assert fresh.diagnosis == "softmax scale not applied (scores unscaled)"


def test_sanity_keeps_cached_result_for_a_kernel_right_on_the_first_input():
    stale = next(m.backend for m in MUTANTS if m.backend.name == "stale-cache")
    verdict = execute("sanity", stale, Case(seqlen_q=33, seqlen_k=33), "cpu")
    (fresh,) = [f for f in verdict.findings if f.property == "fresh-output"]
    assert "did not get its own result (a result cached by shape?)" in fresh.message
    assert fresh.diagnosis is None


def test_a_failure_right_on_a_second_call_is_named_transient_and_still_fails():
    """A kernel wrong only on its first call (the shape of a false alarm once seen on the first case of a
    run): the second opinion says so, and the verdict stays a failure."""
    from conformance.backend import Backend
    from conformance.capabilities import Capabilities

    calls = []

    def first_call_off(q, k, v, **kw):
        calls.append(1)
        out = naive.attention(q, k, v, **kw)
        return out + 1e-4 * torch.randn_like(out) if len(calls) == 1 else out

    case = Case(seed=3)
    verdict = CHECKS["forward"].run(Backend("first-call-off", first_call_off, Capabilities()), case, "cpu")
    assert not verdict.passed and len(calls) == 2
    assert "transient" in verdict.findings[0].message and "second call" in verdict.findings[0].message


def test_a_failure_whose_inputs_changed_under_the_call_says_so():
    """Evidence for the next unexplained failure: inputs that are not the case's after the call (a
    kernel writing into them, or a transport that did not carry them intact) are named."""
    from conformance.backend import Backend
    from conformance.capabilities import Capabilities

    def scales_k_in_place(q, k, v, **kw):
        k.mul_(1 + 1e-3)
        return naive.attention(q, k, v, **kw)

    verdict = CHECKS["forward"].run(Backend("scales-k", scales_k_in_place, Capabilities()), Case(seed=5), "cpu")
    assert not verdict.passed
    assert "inputs changed" in verdict.findings[0].message and "input k differs from the case's" in verdict.findings[0].message


def test_a_reference_that_changes_between_computations_is_the_suites_fault(monkeypatch):
    from dataclasses import replace

    from conformance.backend import Backend
    from conformance.capabilities import Capabilities
    from conformance.checks import forward

    real = forward.expected
    monkeypatch.setattr(forward, "expected", lambda *a, **kw: replace(real(*a, **kw), out=real(*a, **kw).out + 1e-3))
    with pytest.raises(RuntimeError, match="the suite is at fault"):
        CHECKS["forward"].run(Backend("naive", naive.attention, Capabilities()), Case(seed=4), "cpu")
