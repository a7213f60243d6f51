"""The tolerance rule: the one place that decides whether a number is close enough.

A backend's result R for a case (its output, or one of dq, dk, dv) is compared with the float64
reference F, computed from the backend's own rounded inputs (reference.py), by the largest absolute
difference. It passes when

    max|R - F|  <=  M * E_y  +  E_ref  +  0.5 * ulp_dtype(V)  +  (sqrt(n) + 2) * ulp_acc(T)  +  ulp_acc(L) * T

- E_y, the yardstick, is the error of a straightforward PyTorch computation of the same formula on the
  same (rounded) inputs and device: the largest of max|P_i - F| over the evaluation orders in
  ``reference.ORDERS`` (where the scale is applied, how the sums are split, exp or FlashAttention's
  exp2) and, for gradients, by autograd and by FlashAttention's backward formulas. M = 2 for outputs,
  3 for gradients. Which computation (``expected.yardstick_precisions``, ``reference.PRECISIONS``):
  * fp32 and fp64 inputs: in the dtype itself.
  * fp16 and bf16 inputs, a backend declaring ``accumulation="fp32"`` (the default: FlashAttention,
    cuDNN, xFormers, SDPA's kernels and flex all accumulate in float32): in float32 from the rounded
    inputs, the result rounded to the dtype; and the same with P rounded to the dtype before P·V (and,
    backward, P, dS and O before their matmuls), as those kernels feed their tensor cores. Plain
    PyTorch in fp16/bf16 is no yardstick for them: it rounds the scores and probabilities to 16 bits,
    which they do not, and is about 10x less accurate (docs/tolerance.md); twice its error let a kernel
    accumulating its output in bf16 pass at 9-12x a correct kernel's error even at 8192 keys.
  * fp16 and bf16 inputs, a backend declaring ``accumulation="input"`` (naive: plain PyTorch in the
    input dtype): that computation, every intermediate rounded to the dtype (emulated in float32, as
    PyTorch's 16-bit matmuls and softmax accumulate in float32 and round their results).
  * dq, dk, dv of fp16/bf16 inputs: the worst of both (``expected.gradient_precisions``). A
    FlashAttention backward recomputes P from the forward's log-sum-exp and takes D from the 16-bit
    output; where logits are large and a gradient cancels, its error depends on how the forward and the
    backward summed the scores, which no float32 evaluation order reproduces (flash-attn and SDPA's
    flash kernel on the H100: dq 11x the float32 yardstick on a one-query case with logits ~256).
- E_ref is the reference's own error. The reference is float64, so against 16- and 32-bit dtypes it
  is negligible (below the last term) and taken as 0; for float64 inputs it is as large as the
  backend's, and is estimated the same way, by reordering: E_ref = E_y.
- T is the magnitude of the terms that make an element, the largest sum of their absolute values
  (``reference.term_magnitudes``: |P|·|V| for the output, scale·(P∘(|dO|·|V| + |dO|·|O|))·|K| for dq,
  and so on: dP = dO·V and D = dO·O are sums whose own terms count),
  as in the classical bound |error of a sum| <= gamma_n * sum|terms|. A result can cancel to nearly zero
  while its terms do not: dq when one key takes all the weight is ~0 exactly, but every kernel
  computes it as a difference of numbers of size |dP|·|K|.
- V = max|F|, and ulp_dtype(V) the spacing of the dtype's numbers there: rounding a correct result to
  the output dtype costs at most half of it. (Taken at T, as before, it was up to several times looser
  than the rounding of the result itself where the result is much smaller than its terms.)
- n = max(seqlen_q, seqlen_k), the longest sum a kernel accumulates, and ulp_acc is the ulp of its
  accumulation precision (float64 for float64 inputs, float32 otherwise). The 2 more ulps are GPU
  kernels' approximate exponential: FlashAttention-style kernels compute probabilities with the
  hardware exp2 (PTX ex2.approx.f32, relative error up to about 2^-22 per NVIDIA's PTX ISA manual),
  where PyTorch's exp is correctly rounded; every probability may be 2 ulps off, and the output is a
  weighted mean of the values.

- L is the magnitude of the logits' terms (scale·|Q|·|K|, ``reference.term_magnitudes``): a kernel sums
  each logit in its own order, and its backward recomputes P as exp(S - LSE) from its own LSE, so each
  probability may be off by about one ulp of L relative to every yardstick's; the output (a weighted mean
  of V) and the gradients (sums of P-weighted terms) by ulp_acc(L)·T. It matters only for float32
  inputs with large logits, where the yardstick's orders can all happen to round the same way. On the
  H100, xFormers' fp32 output of a 23-token sequence with logits ~50 measured 7.31e-6 against a bound of
  7.29e-6 without it, and its dv for one key (exactly dO; P recomputed as 0.999999) 2.6e-6 against
  8.3e-7 (docs/tolerance.md).

- Under a causal mask or a window the output's rows are not alike: the first rows average a few
  values (large, and rounded to the dtype with a large ulp), the last average thousands (small, with
  errors that grow with the sum's length). Over the whole output, E_y, V and T are the first rows', and
  a kernel whose long rows are several times too far off passes under them (a half-precision output
  accumulator at 4096 causal keys: 2.6x its class's bound, 0.4x the whole output's). The forward
  output is therefore held class by class: rows that see 1-31, 32-63, ... keys
  (``reference.length_classes``; a class of fewer than 16 rows joins the next, so that no yardstick is
  the largest of a handful of errors), each with its own E_y, V and T, and n and L of the whole case.
  Each class's bound is at most the whole output's, so this only tightens the rule.

Why this shape. The error a correct kernel may make depends on the dtype, the lengths, the magnitudes
and the head dim; no fixed atol/rtol fits them all, and a loose fixed one lets real bugs through at
float32. Measuring what a straightforward implementation in the same precision gets wrong on the same
inputs scales the bound with all of those at once. This is the rule of flash-attn's own test suites
(tests/test_flash_attn.py and hopper/test_flash_attn.py in Dao-AILab/flash-attention): the kernel's
error is bounded by a small multiple of a same-precision PyTorch implementation's error plus a floor
from the dtype's rounding; our multiples are theirs (2 forward, 3 gradients, as the issue that
specified this suite records them), and our reference is float64 rather than float32.

Two refinements, each measured on this suite's CPU backends over a few hundred random cases before it
was adopted (docs/tolerance.md has the numbers):
- One evaluation order is a noisy yardstick in float32 and float64: there no step is systematically
  coarser than a kernel's (in 16-bit dtypes the PyTorch implementation rounds the probabilities to 16
  bits, which kernels avoid), so a correct kernel's error lands above twice one order's error in a few
  percent of cases. The worst of several orders -- flash-attn's reference exposes one reordering
  (``reorder_ops``) for the same reason -- gives a yardstick that a correct kernel stays under.
- For float64 inputs the reference is no more precise than the backend (hence E_ref), and
  online-softmax kernels add a rescaling rounding per key block. The sqrt(n) term is the probabilistic rounding-error bound
  for a sum of n terms (Higham and Mary, SIAM J. Sci. Comput. 2019) in the accumulation precision; in
  16-bit dtypes it is negligible beside the other terms, so it does not loosen them.

NaN and infinity are never within tolerance: a non-finite value where the reference is finite fails,
and so does a finite value where the reference is NaN (a backend that declares NaN for fully masked
rows must produce exactly that).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FORWARD_MULTIPLE = 2.0
GRADIENT_MULTIPLE = 3.0
APPROX_EXP_ULPS = 2.0


@dataclass(frozen=True)
class Comparison:
    name: str
    error: float
    bound: float
    torch_error: float
    nonfinite: int  # positions where actual and reference disagree about being finite
    # a failed comparison's evidence of what went wrong: where the largest error is (an index into the
    # output the kernel returned), its value and the reference's there, and how many values are past the
    # bound (one corrupted value, or rows or the whole output)
    worst: tuple[int, ...] = ()
    worst_actual: float = 0.0
    worst_reference: float = 0.0
    past_bound: int = 0

    def __post_init__(self):
        object.__setattr__(self, "worst", tuple(self.worst))  # a list when read back from the journal

    @property
    def passed(self) -> bool:
        return self.nonfinite == 0 and self.error <= self.bound

    def describe(self) -> str:
        if self.nonfinite:
            return (f"{self.name}: {self.nonfinite} values are non-finite where the reference is finite "
                    "(or finite where it is NaN)")
        verdict = "within" if self.passed else "EXCEEDS"
        where = (f"; at {list(self.worst)} {self.worst_actual:.9g} against {self.worst_reference:.9g}, "
                 f"{self.past_bound} value{'s' if self.past_bound != 1 else ''} past the bound") if self.worst else ""
        return (f"{self.name}: max abs error {self.error:.3e} {verdict} bound {self.bound:.3e} "
                f"(PyTorch same-precision error {self.torch_error:.3e}){where}")

    def as_dict(self) -> dict:
        found = {"worst": list(self.worst), "worst_actual": self.worst_actual, "worst_reference": self.worst_reference,
                 "past_bound": self.past_bound} if self.worst else {}
        return {"name": self.name, "error": self.error, "bound": self.bound, "torch_error": self.torch_error,
                "nonfinite": self.nonfinite, **found}


def ulp(dtype: torch.dtype, magnitude: float) -> float:
    """Spacing of ``dtype``'s numbers at ``magnitude`` (the smallest normal's spacing below it)."""
    info = torch.finfo(dtype)
    return info.eps * 2.0 ** math.floor(math.log2(max(magnitude, info.tiny)))


def bound(torch_error: float, magnitude: float, dtype: torch.dtype, multiple: float, n: int,
          value: float | None = None, logits: float = 0.0) -> float:
    """The rule above, for terms of magnitude T = ``magnitude``, results of magnitude V = ``value``
    (max|F|; T when not given) and logits' terms of magnitude L = ``logits`` (0: no such term)."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    reference_error = torch_error if dtype == torch.float64 else 0.0
    value = magnitude if value is None else value
    return (multiple * torch_error + reference_error + 0.5 * ulp(dtype, value)
            + (math.sqrt(n) + APPROX_EXP_ULPS) * ulp(acc, magnitude) + (ulp(acc, logits) * magnitude if logits else 0.0))


def _errors(actual: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """|actual - reference| where both are finite, 0 elsewhere (non-finite values are counted apart)."""
    diff = actual.detach().to(reference.device, torch.float64) - reference  # a new tensor: changed in place
    return diff.abs_().nan_to_num_(0.0, 0.0, 0.0)


def max_abs_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest |actual - reference| where both are finite (non-finite values are counted elsewhere)."""
    errors = _errors(actual, reference)
    return float(errors.max()) if errors.numel() else 0.0


def compare(name: str, actual: torch.Tensor, reference: torch.Tensor, torch_error: float, magnitude: float,
            dtype: torch.dtype, multiple: float, n: int, logits: float = 0.0, at: tuple[int, ...] = ()) -> Comparison:
    """Apply the rule to one tensor: ``reference`` is float64, ``torch_error``, ``magnitude`` (T) and
    ``logits`` (L) as defined above. ``at``: where the compared part starts in the output the kernel
    returned (its first dimensions), so that a failure's worst value is placed in that output."""
    actual = actual.detach().to(reference.device, torch.float64)
    ref_nan = torch.isnan(reference)
    nonfinite = int(((~torch.isfinite(actual)) & ~ref_nan).sum() + (ref_nan & ~torch.isnan(actual)).sum())
    value = float(reference.abs().nan_to_num_(0.0, 0.0, 0.0).max()) if reference.numel() else 0.0
    limit = bound(torch_error, magnitude, dtype, multiple, n, value, logits)
    errors = _errors(actual, reference)
    error = float(errors.max()) if errors.numel() else 0.0
    if error <= limit:
        return Comparison(name, error, limit, torch_error, nonfinite)
    worst = tuple(int(i) for i in torch.unravel_index(errors.argmax(), errors.shape))
    placed = tuple(i + (at[d] if d < len(at) else 0) for d, i in enumerate(worst))
    return Comparison(name, error, limit, torch_error, nonfinite, placed, float(actual[worst]), float(reference[worst]),
                      int((errors > limit).sum()))
