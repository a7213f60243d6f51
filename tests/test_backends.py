"""Adapters translate other conventions correctly (checked against the reference independently of the
suite's grids), and the built-in backends declare what they do."""

import torch

from conformance import reference
from conformance.backend import call
from conformance.backends import naive, sdpa_math, tiled
from conformance.case import Case
from conformance.inputs import make_inputs


def test_sdpa_math_maps_both_alignments():
    for alignment in ("bottom_right", "top_left"):
        case = Case(seqlen_q=7, seqlen_k=11, causal=alignment, dtype="fp64", nheads=4, nheads_k=2)
        inputs = make_inputs(case, "cpu")
        out = call(sdpa_math.BACKEND, inputs.q, inputs.k, inputs.v, case)
        assert torch.allclose(out, reference.attention(inputs.q, inputs.k, inputs.v, case), atol=1e-12)


def test_naive_fills_masked_rows_with_the_mean_of_v_in_every_dtype():
    for dtype in ("fp16", "bf16", "fp32"):
        case = Case(seqlen_q=5, seqlen_k=2, causal="bottom_right", dtype=dtype)
        inputs = make_inputs(case, "cpu")
        out = call(naive.BACKEND, inputs.q, inputs.k, inputs.v, case)
        assert torch.allclose(out[:, 0].float(), inputs.v.float().mean(dim=1), atol=1e-2)


def test_tiled_blocks_do_not_change_the_result_beyond_rounding():
    case = Case(seqlen_q=70, seqlen_k=133, causal="bottom_right", dtype="fp64", window=(20, -1))
    inputs = make_inputs(case, "cpu")
    outs = [tiled.attention(inputs.q, inputs.k, inputs.v, causal=True, window_size=(20, -1), block_q=bq, block_k=bk)
            for bq, bk in ((64, 64), (16, 128), (1, 7))]
    for out in outs[1:]:
        assert torch.allclose(out, outs[0], rtol=0, atol=1e-13)


def test_tiled_never_materialises_the_score_matrix():
    """Every intermediate of the forward is at most (batch, heads, block_q, block_k) or O(seqlen)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        biggest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    Largest.biggest = max(Largest.biggest, t.numel())
            return out

    case = Case(batch=1, seqlen_q=512, seqlen_k=512, nheads=1, head_dim=8)
    inputs = make_inputs(case, "cpu")
    with Largest():
        tiled.attention(inputs.q, inputs.k, inputs.v, block_q=32, block_k=32)
    assert Largest.biggest <= 512 * 8  # the size of q itself; a 512 x 512 matrix would be 32x that
