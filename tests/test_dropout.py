"""The dropout check's statistics beyond the mean: the variance's exact expectation and standard error,
the mask revealed slice by slice where there are more keys than the head dim, rows' independence, and
dropout beside an attn_bias."""

import torch

from conformance.backends import naive, sdpa_math, tiled
from conformance.case import Case
from conformance.checks import dropout, execute
from conformance.inputs import make_inputs


def test_the_variance_statistic_is_the_exact_one():
    """Σ over elements of the sample variance of N outputs: its expectation and standard error against a
    Monte Carlo of the dropped attention itself (200 sets of N = 64 draws of the mask, in float64)."""
    case = Case(batch=1, seqlen_q=3, seqlen_k=5, nheads=1, head_dim=2, dtype="fp64", seed=4)
    inputs = make_inputs(case, "cpu")
    probs, vx = dropout._probabilities(case, inputs, "zeros")
    gen = torch.Generator().manual_seed(0)
    p, n = dropout.P, dropout.SAMPLES
    keep = (torch.rand((200, n, *probs.shape), generator=gen, dtype=torch.float64) >= p) / (1 - p)
    outs = torch.einsum("tnbhqk,bkhd->tnbqhd", probs * keep, vx)
    stats = outs.var(1, correction=1).sum(dim=(1, 2, 3, 4))
    verdict = dropout.Verdict("dropout", "x", case, "cpu")
    exp = type("E", (), {"out": outs[0, 0], "out_torch_error": 0.0, "out_magnitude": 1.0})
    dropout.variance_matches_rate(case, inputs, "zeros", outs[0], exp, verdict)
    got = verdict.measurements["dropout_variance"]
    expectation = float(stats[0]) / got["ratio"]
    sd = (float(stats[0]) - expectation) / got["z"]
    assert abs(float(stats.mean()) - expectation) < 3 * sd / 200 ** 0.5
    assert 0.8 < float(stats.std()) / sd < 1.2


def test_a_dropout_case_with_a_bool_mask_leaving_rows_empty():
    """Rows a (batch, nheads, seqlen_q)-shaped bool mask leaves empty, declared the mean of V (naive) or
    zeros: the fuzz found the check's uniform weights laid out for a (seqlen_q,) mask only."""
    for backend in (naive.BACKEND, sdpa_math.BACKEND, tiled.BACKEND):
        for case_id in ("b2_q1_k1_h1_d1_bf16_biasrows.bhqk_seed0", "b3_q9_k13_h2_d4_fp32_causalbr_biasrows.b11k_seed1"):
            verdict = execute("dropout", backend, Case.from_id(case_id), "cpu")
            assert verdict.passed, verdict.message()


def test_the_mask_is_revealed_slice_by_slice():
    """More keys than the head dim: the identity-V probe takes one call per head_dim keys, and the
    revealed mask gives the call's output (tiled's per-block masks, 40 keys, head dim 16: 3 calls)."""
    case = Case(batch=1, seqlen_q=9, seqlen_k=40, nheads=2, head_dim=16, seed=1)
    verdict = execute("dropout", tiled.BACKEND, case, "cpu")
    assert verdict.passed, verdict.message()
    names = [c.name for c in verdict.comparisons]
    assert "out = A·V" in names and "out = A·V (grad)" in names
    assert abs(verdict.measurements["dropout_kept"] - (1 - dropout.P)) < 0.1
