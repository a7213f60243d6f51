"""Dropout on the attention probabilities (``dropout_p``, as flash-attn and SDPA apply it: each
probability kept with 1 - p and rescaled by 1/(1 - p)), for backends that declare ``dropout``. Outputs
are random, so the check is statistical, seeded where the kernel runs (torch's generators, which these
kernels draw from):

- dropout-mean: over N calls with different seeds, the mean output converges to the dropout-free
  reference: each element's error, over its standard error (the exact variance p/(1-p)·Σ_j P²V² of one
  call, over N, plus the same-precision error), stays below 6, and its mean square below 2 (an unbiased
  kernel gives about 1; one without the rescale gives N·p·(1-p) per element and more), or below
  1 + 8·sqrt(2/rows) where few rows (batch × seqlen_q × heads, each row's elements sharing its mask) make
  the mean square itself noisy;
- dropout-seeded: the same seed gives bitwise the same output; dropout-varies: not all the N seeds give
  the same output (where dropout can change it: a row attending to some key);
- dropout-variance: two-sided, the N outputs' sample variance summed over elements against its exact
  expectation, within 6 of its exact standard errors (widened by the tolerance on each output): a
  kernel dropping at another rate, rescaled by its own 1/(1 - p'), has the right mean and the wrong
  variance (``variance_matches_rate`` derives it);
- dropout-zero: ``dropout_p=0.0`` passed explicitly is attention without dropout (within the tolerance);
- dropout-mask, dropout-gradients: the same seeded call, repeated with V replaced by the identity basis
  on each slice of head_dim keys (at most 16 calls; the same seed gives the same mask), returns the
  dropped probability matrix A = P∘M/(1-p) itself; the call's output must be A·V, the mask M = (A != 0)
  must keep 1 - p of the probabilities within 6 standard errors, and dq, dk, dv must be the gradients
  of that same dropped attention (dV = Aᵀ·dO; dS = P∘(dP - rowsum(P∘dP)) with dP = (dO·Vᵀ)∘M/(1-p)),
  within the tolerance. Probed twice: calls whose inputs require grad, and calls where none does;
- dropout-rows-independent: in the revealed mask, pairs of query rows, of heads and of batch items
  agree at p² + (1-p)² of the keys, within 6 standard errors (a mask shared by rows agrees everywhere).

Cases with an attn_bias (where the backend declares it too) hold the dropout to the biased attention.
"""

from __future__ import annotations

import torch

from conformance import grid, reference
from conformance.backend import Backend, run_kernel_side
from conformance.case import Case
from conformance.checks.check import Check
from conformance.expected import GRAD_NAMES, expected
from conformance.tolerance import FORWARD_MULTIPLE, GRADIENT_MULTIPLE, bound, compare
from conformance.checks.forward import output_comparison
from conformance.inputs import make_inputs
from conformance.verdict import Verdict

NAME = "dropout"
NEEDS: tuple[str, ...] = ("dropout",)
CASE_FEATURE = None  # the case feature the check exercises: every case (fuzzed too) has it
P = 0.2  # the dropout probability
SAMPLES = 64
Z_MAX, MEAN_SQUARE_MAX = 6.0, 2.0
MAX_PROBE_CALLS = 16  # the mask probe's identity-V calls (one per head_dim keys); beyond, the rate is tested
                      # by the variance alone
BASE = Case(batch=2, seqlen_q=33, seqlen_k=40, nheads=4, head_dim=64, dtype="fp32")


def intents() -> list[grid.Intent]:
    b, it = BASE, grid.intent
    return [
        it("dropout", b),
        it("dropout, causal, GQA", b.replace(causal="bottom_right", nheads=8, nheads_k=2)),
        it("dropout, fp16, seqlen_q > seqlen_k", b.replace(dtype="fp16", seqlen_q=65, seqlen_k=17), pin=("dtype",)),
        it("dropout, bf16, head dim 128", b.replace(dtype="bf16", head_dim=128), pin=("dtype",)),
        it("dropout over more keys than the head dim", b.replace(seqlen_k=129)),
        # where the backend declares attn_bias too
        it("dropout with a per-head float bias", b.replace(attn_bias="add.1hqk")),
        it("dropout with a key-padding mask, causal, fp16", b.replace(attn_bias="keep.b11k", causal="bottom_right",
                                                                     dtype="fp16"), 1),
        # standard
        *(it(f"dropout over {n} keys, {dt}", b.replace(seqlen_q=n, seqlen_k=n, dtype=dt), 1, pin=("dtype",))
          for n in (129, 257) for dt in ("fp16", "bf16")),
    ]


def cases(tier: str) -> list[Case]:
    return grid.nominal(intents(), tier)


def _standard_error_sq(case: Case, inputs, masked_rows: str) -> torch.Tensor:
    """The variance of one call's output, elementwise: p/(1-p) * Σ_j P_ij² V_jd² (float64). A row that
    sees no key and is declared the mean of V is dropout over uniform weights: it varies too."""
    probs, vx = _probabilities(case, inputs, masked_rows)
    return P / (1 - P) * torch.einsum("bhqk,bkhd->bqhd", probs**2, vx**2)


def run(backend: Backend, case: Case, device: str) -> Verdict:
    verdict = Verdict(NAME, backend.name, case, device)
    inputs = make_inputs(case, device)
    seed = case.seed * 1000
    outs = run_kernel_side(backend, "dropout_samples", inputs.q, inputs.k, inputs.v, case, P,
                           [seed + i for i in range(SAMPLES)] + [seed])
    outs = outs.to(torch.float64)
    if not bool(torch.equal(outs[0], outs[-1]) or (outs[0].isnan() & outs[-1].isnan()).all()):
        verdict.fail("dropout-seeded", f"two calls with the same seed ({seed}) gave different outputs: max "
                                       f"difference {float((outs[0] - outs[-1]).abs().nan_to_num(0).max()):.3e}")
    one_call_var = _standard_error_sq(case, inputs, backend.capabilities.masked_rows).to(outs.device)
    if float(one_call_var.max()) > 1e-6 and all(torch.equal(outs[0], o) for o in outs[1:SAMPLES]):
        verdict.fail("dropout-varies", f"calls with {SAMPLES} seeds ({seed}...) gave bitwise the same output: the "
                                       "dropout mask ignores the seed")
    probed = -(-case.seqlen_k // case.head_dim) <= MAX_PROBE_CALLS
    # with the gradients' parts when the mask probes will need them (expected.py keeps both in one entry)
    exp = expected(case, device, backend.capabilities.masked_rows, backend.capabilities.backward and probed,
                   backend.capabilities.accumulation)
    mean = outs[:SAMPLES].mean(0)
    var = one_call_var / SAMPLES + (2 * exp.out_torch_error) ** 2
    z = ((mean - exp.out) / var.clamp_min(1e-30).sqrt()).nan_to_num(float("inf"))
    worst, mean_square = float(z.abs().max()), float((z**2).mean())
    rows = case.batch * case.seqlen_q * case.nheads
    square_bound = max(MEAN_SQUARE_MAX, 1 + 8 * (2 / rows) ** 0.5)
    verdict.measurements["dropout"] = {"p": P, "samples": SAMPLES, "max_z": worst, "mean_z2": mean_square}
    if not (worst <= Z_MAX and mean_square <= square_bound):
        verdict.fail("dropout-mean", f"the mean of {SAMPLES} outputs with dropout_p={P} is not the dropout-free "
                                     f"output: largest error {worst:.1f} standard errors (bound {Z_MAX:g}), mean "
                                     f"square {mean_square:.2f} (bound {square_bound:.3g}, about 1 when unbiased)")
    variance_matches_rate(case, inputs, backend.capabilities.masked_rows, outs[:SAMPLES], exp, verdict)
    zero = run_kernel_side(backend, "dropout_samples", inputs.q, inputs.k, inputs.v, case, 0.0, [seed])[0]
    verdict.add("dropout-zero", output_comparison(backend, case, device, out=zero, diagnose=False))
    if probed:
        for grad in (False, True) if backend.capabilities.backward else (False,):
            consistent_with_mask(backend, case, device, inputs, seed, verdict, grad)
    return verdict


def _probabilities(case: Case, inputs, masked_rows: str):
    """float64 (batch, heads, seqlen_q, seqlen_k) probabilities before dropout, with a row that sees no
    key and is declared the mean of V as uniform weights (dropout applies to them too); and V expanded to
    the query heads."""
    q, k, v = (t.detach().to(torch.float64) for t in (inputs.q, inputs.k, inputs.v))
    kx, vx = reference._expand(k, v, case)
    scores, _ = reference._masked_scores(q, kx, case, "scale_q")
    probs = reference._zero_masked_rows(torch.softmax(scores, dim=-1), case)
    empty = reference.fully_masked_rows(case, q.device)
    if empty is not None and masked_rows == "mean_v":
        probs = torch.where(empty.unsqueeze(-1), 1.0 / case.seqlen_k, probs)  # (seqlen_q,) or (b, h, seqlen_q)
    return probs, vx


def _call_bound(case: Case, exp) -> float:
    """The tolerance rule's bound on one call's output under a known mask (as dropout-mask compares it)."""
    return bound(2 * exp.out_torch_error / (1 - P), exp.out_magnitude / (1 - P), case.torch_dtype, FORWARD_MULTIPLE,
                 max(case.seqlen_q, case.seqlen_k))


def variance_matches_rate(case: Case, inputs, masked_rows: str, outs: torch.Tensor, exp, verdict: Verdict) -> None:
    """dropout-variance, two-sided: a kernel that drops at another rate p' and rescales by 1/(1-p') has
    the right mean; its variance is p'/(1-p') Σ P²V² instead of p/(1-p) Σ P²V².

    Statistic: S = Σ over rows and head-dim elements of the N outputs' sample variance (N - 1 in the
    denominator). One row's output is Y = Σ_j c_j M_j with c_j = P_j V_j / (1-p) and M_j independent
    Bernoulli(1-p), so exactly: E[tr S_row] = tr Σ_row, Σ_row = p(1-p) Σ_j c_j c_jᵀ, and
    Var(tr S_row) = κ4 Σ_j |c_j|⁴ / N + 2 ‖Σ_row‖_F² / (N-1), κ4 = p(1-p)(1 - 6p(1-p)) the Bernoulli's
    fourth cumulant (the sample covariance's covariance, from the cumulants of a sum of independent
    terms). Rows' masks are independent, so E[S] and Var(S) are the rows' sums, and S must lie within
    Z_MAX standard errors of E[S]. Each call's output may be off by the tolerance bound τ per element
    (its rounding, not dropout): √S moves by at most ρ = τ √(N·elements/(N-1)) (the triangle
    inequality on the centred samples), which widens the interval on √S by ρ on both sides."""
    probs, vx = _probabilities(case, inputs, masked_rows)
    probs, vx = probs.to(outs.device), vx.to(outs.device)
    p, n = P, outs.shape[0]
    w = probs * probs
    norms = (vx * vx).sum(-1)  # (batch, seqlen_k, heads)
    expect = p / (1 - p) * torch.einsum("bhqk,bkh->bhq", w, norms)
    gram = torch.einsum("bkhd,blhd->bhkl", vx, vx)
    frobenius = (p / (1 - p)) ** 2 * torch.einsum("bhql,bhql->bhq", torch.einsum("bhqk,bhkl->bhql", w, gram * gram), w)
    kappa4 = p * (1 - p) * (1 - 6 * p * (1 - p))
    fourth = kappa4 / (1 - p) ** 4 * torch.einsum("bhqk,bkh->bhq", w * w, norms * norms)
    var = fourth / n + 2 * frobenius / (n - 1)
    rows = torch.isfinite(exp.out).all(-1).permute(0, 2, 1).to(outs.device)  # (batch, heads, seqlen_q): not NaN
    got = outs.var(0, correction=1).sum(-1).permute(0, 2, 1)  # (batch, heads, seqlen_q)
    e_s, sd = float(expect[rows].sum()), float(var[rows].sum()) ** 0.5
    if e_s <= 0 or sd == 0:
        return
    s = float(got[rows].sum()) if bool(torch.isfinite(got[rows]).all()) else float("inf")
    rho = _call_bound(case, exp) * (n * int(rows.sum()) * case.head_dim / (n - 1)) ** 0.5
    low, high = max(0.0, (max(0.0, e_s - Z_MAX * sd)) ** 0.5 - rho) ** 2, ((e_s + Z_MAX * sd) ** 0.5 + rho) ** 2
    verdict.measurements["dropout_variance"] = {"ratio": s / e_s, "z": (s - e_s) / sd, "low": low / e_s,
                                                "high": high / e_s}
    if not low <= s <= high:
        verdict.fail("dropout-variance",
                     f"the {n} outputs' variance (summed over elements) is {s / e_s:.3f} of what dropout_p={P} "
                     f"gives ({(s - e_s) / sd:+.1f} standard errors; bounds {low / e_s:.3f}..{high / e_s:.3f}: "
                     f"{Z_MAX:g} standard errors, widened by the tolerance on each output): a rate other than "
                     f"dropout_p, rescaled by its own 1/(1 - p), keeps the mean and changes the variance")


def consistent_with_mask(backend: Backend, case: Case, device: str, inputs, seed: int, verdict: Verdict,
                         grad: bool) -> None:
    """The output (and, with ``grad``, the gradients) of one seeded call against the dropped attention
    its mask defines; the mask's rate and its rows' independence. Calls with inputs requiring grad and
    calls without are probed apart: a kernel may take another path for each."""
    got = run_kernel_side(backend, "dropout_with_mask", inputs.q, inputs.k, inputs.v, inputs.dout, case, P, seed, grad)
    out, grads, revealed = got[0], got[1:-1], got[-1]
    calls = "calls with inputs requiring grad" if grad else "calls with no input requiring grad"
    a = revealed.to(torch.float64).permute(0, 2, 1, 3)  # (batch, heads, seqlen_q, seqlen_k)
    q, k, v, dout = (t.detach().to(torch.float64) for t in (inputs.q, inputs.k, inputs.v, inputs.dout))
    kx, vx = reference._expand(k, v, case)
    scores, capped = reference._masked_scores(q, kx, case, "scale_q")
    probs = reference._zero_masked_rows(torch.softmax(scores, dim=-1), case)
    kept = (a != 0) & (probs > 0)
    # the kept fraction over probabilities the kernel cannot have rounded to 0 (fp16, exp's underflow)
    counted = probs > 1e-3
    fraction = float((kept & counted).sum()) / max(1, int(counted.sum()))
    verdict.measurements["dropout_kept" + ("_grad" if grad else "")] = fraction
    exp = expected(case, device, backend.capabilities.masked_rows, backend.capabilities.backward,
                   backend.capabilities.accumulation)
    n = max(case.seqlen_q, case.seqlen_k)
    verdict.add("dropout-mask", compare("out = A·V" + (" (grad)" if grad else ""), out,
                                        torch.einsum("bhqk,bkhd->bqhd", a, vx),
                                        2 * exp.out_torch_error / (1 - P), exp.out_magnitude / (1 - P),
                                        case.torch_dtype, FORWARD_MULTIPLE, n))
    kept_bound = Z_MAX * (P * (1 - P) / max(1, int(counted.sum()))) ** 0.5
    if bool(counted.any()) and abs(fraction - (1 - P)) > kept_bound:
        verdict.fail("dropout-mask", f"on {calls}, the mask keeps {fraction:.4f} of the probabilities; with "
                                     f"dropout_p={P} about {1 - P:g} (bound ±{kept_bound:.4f}, {Z_MAX:g} standard errors)")
    rows_independent(kept, counted, calls, verdict)
    if not grads:
        return
    dp = torch.einsum("bqhd,bkhd->bhqk", dout, vx) * kept / (1 - P)
    want = _gradients(case, probs, capped, dp, (probs * dp).sum(-1, keepdim=True), a, q, kx, dout)
    # A kernel takes D = rowsum(dO∘O) from its own output, rounded to the dtype (the dropout-free
    # yardstick cannot show that rounding: O = V/(1-p) is not V). The same gradients with the D of the
    # kernel's output (itself held to A·V above) measure what that rounding may cost.
    own_d = (dout * out.detach().to(torch.float64)).sum(-1).transpose(1, 2).unsqueeze(-1)
    own = _gradients(case, probs, capped, dp, own_d, a, q, kx, dout)
    for name, g, w, o, err, mag in zip(GRAD_NAMES, grads, want, own, exp.grad_torch_errors, exp.grad_magnitudes):
        yardstick = max(2 * err / (1 - P), float((o - w).abs().max()))
        verdict.add("dropout-gradients", compare(name, g, w, yardstick, mag / (1 - P), case.torch_dtype,
                                                 GRADIENT_MULTIPLE, n, exp.logit_magnitude))


def rows_independent(kept: torch.Tensor, counted: torch.Tensor, calls: str, verdict: Verdict) -> None:
    """dropout-rows-independent: each probability is kept independently, so two different rows (of one
    head; of two heads; of two batch items) agree at a key with probability π = p² + (1-p)². Over
    disjoint pairs of rows (0 with 1, 2 with 3, ...: independent pairs) and the keys counted in both,
    the number of agreements is Binomial(m, π); it must lie within Z_MAX standard errors, √(mπ(1-π)), of
    mπ. A mask shared by rows (or heads, or batch items) agrees everywhere."""
    pi = P * P + (1 - P) * (1 - P)
    for dim, what in ((2, "query rows of a head"), (1, "heads"), (0, "batch items")):
        pairs = kept.shape[dim] // 2 * 2
        if pairs == 0:
            continue
        (even, odd), (even_counted, odd_counted) = (_pairs(t, dim, pairs) for t in (kept, counted))
        both = even_counted & odd_counted
        m = int(both.sum())
        if m == 0:
            continue
        agree = int(((even == odd) & both).sum())
        z = (agree - m * pi) / (m * pi * (1 - pi)) ** 0.5
        if abs(z) > Z_MAX:
            verdict.fail("dropout-rows-independent",
                         f"on {calls}, the masks of pairs of {what} agree at {agree / m:.4f} of {m} keys; independent "
                         f"masks agree at p² + (1-p)² = {pi:.4f} ({z:+.1f} standard errors, bound {Z_MAX:g})")


def _pairs(t: torch.Tensor, dim: int, pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Along ``dim``, the even and the odd ones of its first ``pairs`` entries."""
    shape = list(t.shape)
    shape[dim: dim + 1] = [pairs // 2, 2]
    t = t.narrow(dim, 0, pairs).reshape(shape)
    return t.select(dim + 1, 0), t.select(dim + 1, 1)


def _gradients(case: Case, probs, capped, dp, d, a, q, kx, dout) -> tuple:
    """dq, dk, dv of the dropped attention, for dP (dropout applied) and D = rowsum(dO∘O)."""
    ds = probs * (dp - d)
    if capped is not None:  # through the soft cap: d(cap·tanh(s/cap))/ds = 1 - tanh²
        ds = ds * (1 - capped * capped)
    want = (torch.einsum("bhqk,bkhd->bqhd", ds, kx) * case.scale,
            torch.einsum("bhqk,bqhd->bkhd", ds, q) * case.scale,
            torch.einsum("bhqk,bqhd->bkhd", a, dout))
    group = case.nheads // case.nheads_k
    return (want[0], *(t.reshape(*t.shape[:2], case.nheads_k, group, -1).sum(3) for t in want[1:]))


CHECK = Check(NAME, cases, run, needs=NEEDS, feature=CASE_FEATURE, intents=intents, reference="gradients")
