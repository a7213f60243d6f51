"""The tolerance rule: its bound, its handling of non-finite values, and that it can fail."""

import math

import pytest

import torch

from conformance.case import Case
from conformance.inputs import make_inputs
from conformance.tolerance import FORWARD_MULTIPLE, GRADIENT_MULTIPLE, bound, compare, ulp


def test_ulp():
    assert ulp(torch.float32, 1.0) == 2.0**-23
    assert ulp(torch.bfloat16, 3.0) == 2.0**-6
    assert ulp(torch.float16, 0.0) > 0


def test_bound_formula():
    expected = 2 * 1e-3 + 0.5 * ulp(torch.float16, 0.3) + (math.sqrt(100) + 2) * ulp(torch.float32, 2.0)
    assert bound(1e-3, 2.0, torch.float16, 2.0, 100, 0.3) == pytest.approx(expected)
    assert bound(0.0, 1.0, torch.float64, 2.0, 4) == pytest.approx(ulp(torch.float64, 1.0) * 4.5)
    assert bound(1e-15, 1.0, torch.float64, 2.0, 1) == pytest.approx(3e-15 + 3.5 * ulp(torch.float64, 1.0))  # + E_ref


def test_compare_passes_within_and_fails_beyond():
    ref = torch.randn(100, dtype=torch.float64)
    within = compare("out", ref + 1e-7, ref, 1e-7, 1.0, torch.float32, FORWARD_MULTIPLE, 16)
    beyond = compare("out", ref + 1e-5, ref, 1e-7, 1.0, torch.float32, FORWARD_MULTIPLE, 16)
    assert within.passed and not beyond.passed and "EXCEEDS" in beyond.describe()


def test_non_finite_values_never_pass():
    ref = torch.zeros(4, dtype=torch.float64)
    actual = torch.tensor([0.0, float("nan"), 0.0, float("inf")])
    assert compare("out", actual, ref, 1.0, 1.0, torch.float32, 2.0, 1).nonfinite == 2
    ref_nan = torch.tensor([float("nan"), 0.0], dtype=torch.float64)
    assert not compare("out", torch.zeros(2), ref_nan, 1.0, 1.0, torch.float32, 2.0, 1).passed
    assert compare("out", torch.tensor([float("nan"), 0.0]), ref_nan, 0.0, 1.0, torch.float32, 2.0, 1).passed


def _one_ulp(x: torch.Tensor) -> torch.Tensor:
    return torch.finfo(torch.float32).eps * 2.0 ** torch.floor(torch.log2(x))


def test_a_single_key_gradient_off_by_one_rounding_of_its_sums_passes():
    """dq of one query on one key is exactly zero; a kernel gets it as dP - D, two float32 dot products
    of the same value. Each one rounding off (of their terms' magnitude, sum|dO||V|): within the bound
    (xFormers' fp32 dq on the H100 was 2x a bound that took |dP| and |D| for their terms)."""
    from conformance.expected import expected

    for seed in range(10):
        case = Case(batch=1, seqlen_q=1, seqlen_k=1, nheads=1, head_dim=36, dtype="fp32", seed=seed)
        inputs = make_inputs(case, "cpu")
        exp = expected(case, "cpu", "zeros", True)
        k, v, do = (t[0, :, 0].double() for t in (inputs.k, inputs.v, inputs.dout))
        ds = 2 * _one_ulp((do.abs() * v.abs()).sum())  # dP rounded up, D rounded down
        dq = (ds * k * case.scale).view(1, 1, 1, -1)
        assert compare("dq", dq, exp.grads[0], exp.grad_torch_errors[0], exp.grad_magnitudes[0], torch.float32,
                       GRADIENT_MULTIPLE, 1).passed, seed


def test_logits_off_by_one_rounding_of_their_terms_pass_and_need_the_logit_term():
    """Each logit one ulp of scale*sum|q||k| off (a float32 dot product's rounding, in the kernel's own
    order): within the bound with logits ~50, and outside it without the logit term."""
    from conformance.expected import expected

    ratios = []
    for seed in range(10):
        case = Case(batch=1, seqlen_q=23, seqlen_k=23, nheads=1, head_dim=36, dtype="fp32", magnitude=4, seed=seed)
        inputs = make_inputs(case, "cpu")
        exp = expected(case, "cpu", "zeros", False)
        q, k = inputs.q.double(), inputs.k.double()
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * case.scale
        terms = torch.einsum("bqhd,bkhd->bhqk", q.abs(), k.abs()) * case.scale
        sign = torch.randint(0, 2, scores.shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1
        probs = torch.softmax(scores + sign * _one_ulp(terms), dim=-1)
        out = torch.einsum("bhqk,bkhd->bqhd", probs, inputs.v.double())
        args = ("out", out, exp.out, exp.out_torch_error, exp.out_magnitude, torch.float32, FORWARD_MULTIPLE, 23)
        with_term = compare(*args, exp.logit_magnitude)
        assert with_term.passed, seed
        ratios.append(compare(*args).error / compare(*args).bound)
    assert max(ratios) > 1  # the term is needed


def test_a_single_key_dv_from_a_probability_one_ulp_of_the_logit_off_passes():
    """dv of one query on one key is exactly dO; a backward recomputing P = exp(S - LSE) from its own LSE
    gets P one ulp of the logit's terms below 1 (xFormers on the H100: 0.999999, dv 3x the old bound)."""
    from conformance.expected import expected

    for seed in range(10):
        case = Case(batch=1, seqlen_q=1, seqlen_k=1, nheads=1, head_dim=36, dtype="fp32", magnitude=4, seed=seed)
        inputs = make_inputs(case, "cpu")
        exp = expected(case, "cpu", "zeros", True)
        p = 1 - _one_ulp(torch.tensor(exp.logit_magnitude, dtype=torch.float64))
        dv = p * inputs.dout.double()
        args = ("dv", dv, exp.grads[2], exp.grad_torch_errors[2], exp.grad_magnitudes[2], torch.float32,
                GRADIENT_MULTIPLE, 1)
        assert compare(*args, exp.logit_magnitude).passed and not compare(*args).passed, seed


def test_max_abs_error_leaves_out_non_finite_differences():
    import torch

    from conformance.tolerance import max_abs_error

    ref = torch.zeros(4, dtype=torch.float64)
    assert max_abs_error(torch.tensor([float("inf"), float("-inf"), float("nan"), 1.0]), ref) == 1.0
    assert max_abs_error(torch.tensor([float("nan")]), ref[:1]) == 0.0


def test_a_failed_comparison_says_where_its_worst_value_is_and_how_many_values_are_past_the_bound():
    """One corrupted value and a wrong output look alike in the largest error; the failure tells them apart
    (the position, the two values, the count past the bound), and keeps that through the journal."""
    from conformance.tolerance import Comparison

    ref = torch.randn(2, 16, 3, 8, dtype=torch.float64)
    one = ref.float()
    one[1, 9, 2, 5] += 0.01
    single = compare("out", one, ref, 1e-7, 1.0, torch.float32, FORWARD_MULTIPLE, 16)
    assert (single.worst, single.past_bound) == ((1, 9, 2, 5), 1)
    assert single.worst_actual == float(one[1, 9, 2, 5]) and single.worst_reference == float(ref[1, 9, 2, 5])
    assert "at [1, 9, 2, 5]" in single.describe() and "1 value past the bound" in single.describe()
    assert Comparison(**single.as_dict()) == single  # through the journal, the position stays a tuple
    shifted = compare("out", one, ref, 1e-7, 1.0, torch.float32, FORWARD_MULTIPLE, 16, at=(3, 100))
    assert shifted.worst == (4, 109, 2, 5)  # a part starting at batch 3, row 100 of the kernel's output
    everywhere = compare("out", (ref * 1.01).float(), ref, 1e-7, 1.0, torch.float32, FORWARD_MULTIPLE, 16)
    assert everywhere.past_bound > 0.9 * ref.numel()
    passed = compare("out", ref.float(), ref, 1e-7, 1.0, torch.float32, FORWARD_MULTIPLE, 16)
    assert passed.worst == () and "past the bound" not in passed.describe() and "worst" not in passed.as_dict()


def test_the_forward_checks_worst_value_is_placed_in_the_whole_output_under_a_causal_mask():
    """Under a causal mask the output is compared per class of rows; the worst value's query row is still
    the output's own, not its index within the class."""
    from conformance.checks import forward
    from conformance.expected import expected

    case = Case(batch=1, seqlen_q=128, seqlen_k=128, nheads=2, head_dim=16, causal="bottom_right", seed=3)
    exp = expected(case, "cpu", "zeros", False)
    assert exp.out_classes is not None
    out = exp.out.float()
    out[0, 90, 1, 7] += 0.05  # in the class of rows seeing 64-128 keys, its 27th row
    comparison, _ = forward._compare(out, exp, case)
    assert not comparison.passed and comparison.worst == (0, 90, 1, 7)
