"""The reference is checked against cases whose answer is known without it."""

import torch

from conformance import reference
from conformance.case import Case
from conformance.inputs import make_inputs


def test_single_key_returns_its_value():
    case = Case(seqlen_q=5, seqlen_k=1, dtype="fp64")
    inputs = make_inputs(case, "cpu")
    out = reference.attention(inputs.q, inputs.k, inputs.v, case)
    assert torch.allclose(out, inputs.v.expand_as(out), rtol=0, atol=1e-15)


def test_zero_queries_average_the_visible_values():
    case = Case(batch=1, seqlen_q=3, seqlen_k=5, nheads=1, head_dim=4, dtype="fp64", causal="bottom_right")
    v = torch.randn(1, 5, 1, 4, dtype=torch.float64)
    out = reference.attention(torch.zeros(1, 3, 1, 4, dtype=torch.float64), torch.randn_like(v), v, case)
    for i in range(3):  # bottom-right: query i sees keys 0 .. i + 2
        assert torch.allclose(out[0, i], v[0, : i + 3].mean(dim=0), atol=1e-15)


def test_alignments_and_fully_masked_rows():
    br = Case(seqlen_q=4, seqlen_k=2, causal="bottom_right")
    assert reference.allowed(br).tolist() == [[False, False], [False, False], [True, False], [True, True]]
    assert reference.fully_masked_rows(br).tolist() == [True, True, False, False]
    tl = br.replace(causal="top_left")
    assert reference.allowed(tl).tolist() == [[True, False], [True, True], [True, True], [True, True]]
    assert reference.fully_masked_rows(tl) is None
    window = Case(seqlen_q=3, seqlen_k=3, window=(1, 0))
    assert reference.allowed(window).tolist() == [[True, False, False], [True, True, False], [False, True, True]]


def test_masked_row_conventions():
    case = Case(batch=1, seqlen_q=3, seqlen_k=2, nheads=1, head_dim=4, dtype="fp64", causal="bottom_right")
    inputs = make_inputs(case, "cpu")
    zeros = reference.attention(inputs.q, inputs.k, inputs.v, case)
    assert torch.equal(zeros[0, 0], torch.zeros(1, 4, dtype=torch.float64))
    mean = reference.attention(inputs.q, inputs.k, inputs.v, case, masked_rows="mean_v")
    assert torch.allclose(mean[0, 0, 0], inputs.v[0, :, 0].double().mean(0))
    assert torch.isnan(reference.attention(inputs.q, inputs.k, inputs.v, case, masked_rows="nan")[0, 0]).all()
    assert torch.equal(mean[0, 1:], zeros[0, 1:])


def test_every_order_and_flash_backward_agree_with_autograd_in_float64():
    case = Case(seqlen_q=9, seqlen_k=13, nheads=4, nheads_k=2, head_dim=6, dtype="fp64", causal="bottom_right",
                softcap=3.0, alibi=True, window=(4, -1))
    inputs = make_inputs(case, "cpu")
    leaves = [t.detach().clone().requires_grad_() for t in (inputs.q, inputs.k, inputs.v)]
    for masked_rows in ("zeros", "mean_v"):
        out = reference.attention(*leaves, case, masked_rows=masked_rows)
        grads = torch.autograd.grad(out, leaves, inputs.dout)
        for order in reference.ORDERS:
            other = reference.attention(*leaves, case, masked_rows=masked_rows, order=order)
            assert torch.allclose(other, out, rtol=0, atol=1e-13)
            flash = reference.flash_backward(inputs.q, inputs.k, inputs.v, inputs.dout, case,
                                             masked_rows=masked_rows, order=order)
            for a, b in zip(flash, grads):
                assert torch.allclose(a, b, rtol=0, atol=1e-12)


def test_alibi_bias_follows_flash_attn_definition():
    case = Case(seqlen_q=2, seqlen_k=3, nheads=2, alibi=True)
    bias = reference.alibi_bias(case)
    slope0 = 2.0 ** -4
    assert torch.allclose(bias[0], -slope0 * torch.tensor([[1.0, 0, 1], [2, 1, 0]], dtype=torch.float64))


def test_term_magnitudes_bound_the_result_and_survive_its_cancellation():
    # one key holds all the weight: dq is ~0 in exact arithmetic, its terms are not
    case = Case(batch=1, seqlen_q=1, seqlen_k=2, nheads=1, head_dim=8, dtype="fp64", magnitude=16)
    inputs = make_inputs(case, "cpu")
    leaves = [t.detach().clone().requires_grad_() for t in (inputs.q, inputs.k, inputs.v)]
    out = reference.attention(*leaves, case)
    dq, dk, dv = torch.autograd.grad(out, leaves, inputs.dout)
    mags = reference.term_magnitudes(inputs.q, inputs.k, inputs.v, inputs.dout, case)
    for result, magnitude in zip((out, dq, dk, dv), mags):
        assert float(result.abs().max()) <= magnitude * (1 + 1e-12)
    assert float(dq.abs().max()) < 1e-10 < mags[1]


def test_length_classes_group_rows_by_the_keys_they_see():
    causal = Case(batch=1, seqlen_q=4096, seqlen_k=4096, nheads=1, head_dim=16, causal="bottom_right")
    classes = reference.length_classes(causal)
    assert [(lo, hi, len(rows)) for lo, hi, rows in classes] == [
        (1, 31, 31), (32, 63, 32), (64, 127, 64), (128, 255, 128), (256, 511, 256), (512, 1023, 512),
        (1024, 2047, 1024), (2048, 4096, 2049)]  # the few first and the one last row join their neighbours
    assert sorted(torch.cat([rows for _, _, rows in classes]).tolist()) == list(range(4096))
    empty = reference.length_classes(causal.replace(seqlen_q=129, seqlen_k=17))
    assert [(lo, hi, len(rows)) for lo, hi, rows in empty] == [(0, 0, 112), (1, 17, 17)]
    assert reference.length_classes(causal.replace(causal=None)) is None  # every row sees every key
    assert reference.length_classes(causal.replace(seqlen_q=65, seqlen_k=65, causal=None, window=(8, 0))) is None
