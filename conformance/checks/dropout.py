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
- dropout-zero: ``dropout_p=0.0`` passed explicitly is attention without dropout (within the tolerance);
- dropout-mask, dropout-gradients (head_dim >= seqlen_k): the same seeded call with V replaced by the
  identity basis returns the dropped probability matrix A = P∘M/(1-p) itself; the call's output must be
  A·V, the mask M = (A != 0) must keep about 1 - p of the probabilities, and dq, dk, dv must be the
  gradients of that same dropped attention (dV = Aᵀ·dO; dS = P∘(dP - rowsum(P∘dP)) with
  dP = (dO·Vᵀ)∘M/(1-p)), within the tolerance.
"""

from __future__ import annotations

import torch

from conformance import grid, reference
from conformance.backend import Backend, run_kernel_side
from conformance.case import Case
from conformance.checks.check import Check
from conformance.expected import GRAD_NAMES, expected
from conformance.tolerance import FORWARD_MULTIPLE, GRADIENT_MULTIPLE, compare
from conformance.checks.forward import output_comparison
from conformance.inputs import make_inputs
from conformance.verdict import Verdict

NAME = "dropout"
NEEDS: tuple[str, ...] = ("dropout",)
CASE_FEATURE = None  # the case feature the check exercises: every case (fuzzed too) has it
P = 0.2  # the dropout probability
SAMPLES = 64
Z_MAX, MEAN_SQUARE_MAX = 6.0, 2.0
BASE = Case(batch=2, seqlen_q=33, seqlen_k=40, nheads=4, head_dim=64, dtype="fp32")


def intents() -> list[grid.Intent]:
    b, it = BASE, grid.intent
    return [
        it("dropout", b),
        it("dropout, causal, GQA", b.replace(causal="bottom_right", nheads=8, nheads_k=2)),
        it("dropout, fp16, seqlen_q > seqlen_k", b.replace(dtype="fp16", seqlen_q=65, seqlen_k=17), pin=("dtype",)),
        it("dropout, bf16, head dim 128", b.replace(dtype="bf16", head_dim=128), pin=("dtype",)),
        # standard
        *(it(f"dropout over {n} keys, {dt}", b.replace(seqlen_q=n, seqlen_k=n, dtype=dt), 1, pin=("dtype",))
          for n in (129, 257) for dt in ("fp16", "bf16")),
    ]


def cases(tier: str) -> list[Case]:
    return grid.nominal(intents(), tier)


def _standard_error_sq(case: Case, inputs, masked_rows: str) -> torch.Tensor:
    """The variance of one call's output, elementwise: p/(1-p) * Σ_j P_ij² V_jd² (float64). A row that
    sees no key and is declared the mean of V is dropout over uniform weights: it varies too."""
    q, k, v = (t.detach().to(torch.float64) for t in (inputs.q, inputs.k, inputs.v))
    kx, vx = reference._expand(k, v, case)
    scores, _ = reference._masked_scores(q, kx, case, "scale_q")
    probs = reference._zero_masked_rows(torch.softmax(scores, dim=-1), case)
    empty = reference.fully_masked_rows(case, q.device)
    if empty is not None and masked_rows == "mean_v":
        probs = torch.where(empty.view(-1, 1), 1.0 / case.seqlen_k, probs)
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
    exp = expected(case, device, backend.capabilities.masked_rows, False, backend.capabilities.accumulation)
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
    zero = run_kernel_side(backend, "dropout_samples", inputs.q, inputs.k, inputs.v, case, 0.0, [seed])[0]
    verdict.add("dropout-zero", output_comparison(backend, case, device, out=zero, diagnose=False))
    if case.head_dim >= case.seqlen_k:
        consistent_with_mask(backend, case, device, inputs, seed, verdict)
    return verdict


def consistent_with_mask(backend: Backend, case: Case, device: str, inputs, seed: int, verdict: Verdict) -> None:
    """The output and gradients of one seeded call against the dropped attention its mask defines."""
    got = run_kernel_side(backend, "dropout_with_mask", inputs.q, inputs.k, inputs.v, inputs.dout, case, P, seed)
    out, grads, revealed = got[0], got[1:-1], got[-1]
    a = revealed[..., : case.seqlen_k].to(torch.float64).permute(0, 2, 1, 3)  # (batch, heads, seqlen_q, seqlen_k)
    q, k, v, dout = (t.detach().to(torch.float64) for t in (inputs.q, inputs.k, inputs.v, inputs.dout))
    kx, vx = reference._expand(k, v, case)
    scores, capped = reference._masked_scores(q, kx, case, "scale_q")
    probs = reference._zero_masked_rows(torch.softmax(scores, dim=-1), case)
    kept = (a != 0) & (probs > 0)
    # the kept fraction over probabilities the kernel cannot have rounded to 0 (fp16, exp's underflow)
    counted = probs > 1e-3
    fraction = float((kept & counted).sum()) / max(1, int(counted.sum()))
    verdict.measurements["dropout_kept"] = fraction
    exp = expected(case, device, backend.capabilities.masked_rows, backend.capabilities.backward,
                   backend.capabilities.accumulation)
    n = max(case.seqlen_q, case.seqlen_k)
    verdict.add("dropout-mask", compare("out = A·V", out, torch.einsum("bhqk,bkhd->bqhd", a, vx),
                                        2 * exp.out_torch_error / (1 - P), exp.out_magnitude / (1 - P),
                                        case.torch_dtype, FORWARD_MULTIPLE, n))
    kept_bound = 6 * (P * (1 - P) / max(1, int(counted.sum()))) ** 0.5
    if bool(counted.any()) and abs(fraction - (1 - P)) > kept_bound:
        verdict.fail("dropout-mask", f"the mask keeps {fraction:.4f} of the probabilities; with dropout_p={P} "
                                     f"about {1 - P:g} (bound ±{kept_bound:.4f})")
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


CHECK = Check(NAME, cases, run, needs=NEEDS, feature=CASE_FEATURE, intents=intents)
