"""What a case's result must be: the float64 reference, and the same-precision PyTorch error that
scales its tolerance (tolerance.py), for the output and, when asked, for dq, dk, dv.

It depends only on the case, the device and the declared masked-row convention, so the last one is
kept: consecutive tests of several backends on one case compute it once.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from conformance import reference
from conformance.case import Case
from conformance.inputs import Inputs, make_inputs
from conformance.tolerance import max_abs_error

GRAD_NAMES = ("dq", "dk", "dv")


@dataclass
class Expected:
    out: torch.Tensor  # float64
    out_torch_error: float
    out_magnitude: float  # the terms' magnitude (reference.term_magnitudes), for the tolerance's floor
    logit_magnitude: float  # that of the logits' terms, for the tolerance's logit-rounding term
    grads: tuple[torch.Tensor, ...] | None  # float64 dq, dk, dv
    grad_torch_errors: tuple[float, ...] | None
    grad_magnitudes: tuple[float, ...] | None
    # causal masks and windows: the output's rows by how many keys they see (reference.length_classes),
    # each with its own yardstick error and terms' magnitude; None when all rows see as many keys
    out_classes: tuple[RowClass, ...] | None = None


@dataclass(frozen=True)
class RowClass:
    fewest: int  # keys the rows of the class see, at least and at most
    most: int
    rows: torch.Tensor  # query row indices
    torch_error: float
    magnitude: float


def _attention_and_grads(inputs: Inputs, case: Case, grads: bool, upcast: bool = True, **kwargs):
    """Output (and dq, dk, dv) of the formula; float64 leaves when ``upcast``, so gradients stay float64.
    Not upcast, the leaves are in the case's dtype and the gradients come back rounded to it."""
    dtype = torch.float64 if upcast else case.torch_dtype
    leaves = tuple(t.detach().to(dtype).requires_grad_(grads) for t in (inputs.q, inputs.k, inputs.v))
    with torch.enable_grad():
        out = reference.attention(*leaves, case, upcast=upcast, **kwargs)
        if not grads:
            return out.detach(), None
        return out.detach(), torch.autograd.grad(out, leaves, inputs.dout.to(dtype))


def yardstick_precisions(dtype: torch.dtype, accumulation: str) -> tuple[str, ...]:
    """The emulated computations whose error scales the tolerance (reference.PRECISIONS): for 16-bit
    inputs, those of a kernel that accumulates in float32 ("fp32", the default declaration, as
    FlashAttention kernels do), or in the input dtype ("input", plain PyTorch in fp16/bf16); for fp32
    and fp64 inputs the computation in the dtype itself."""
    if dtype not in (torch.float16, torch.bfloat16):
        return ("input",)
    return ("input",) if accumulation == "input" else ("fp32", "fp32_p")


def gradient_precisions(dtype: torch.dtype, accumulation: str) -> tuple[str, ...]:
    """For dq, dk, dv of 16-bit inputs, the input-dtype computation too: a FlashAttention backward
    recomputes P from the forward's log-sum-exp and takes D from the 16-bit output, and where logits
    are large and the gradient cancels (a peaked softmax) its error depends on how the forward and
    backward scores were summed, which no single float32 evaluation order reproduces (flash-attn on the
    H100: dq 11x the float32 yardstick on a decode case with logits ~256; docs/tolerance.md). The
    outputs keep the float32 yardstick."""
    own = yardstick_precisions(dtype, accumulation)
    return own if "input" in own else (*own, "input")


@functools.lru_cache(maxsize=48)
def _expected(case: Case, device: str, masked_rows: str, grads: bool, accumulation: str) -> Expected:
    return expected_for(make_inputs(case, device), case, masked_rows, grads, accumulation)


def expected(case: Case, device: str, masked_rows: str, grads: bool, accumulation: str = "fp32") -> Expected:
    """For the case's own inputs (``inputs.make_inputs``). Kept for the last cases seen, so that several
    backends on one case (and self-tests running many backends over one grid) compute it once."""
    if reference.fully_masked_rows(case) is None:
        masked_rows = "zeros"  # the convention cannot matter: share the entry
    if case.torch_dtype not in (torch.float16, torch.bfloat16):
        accumulation = "fp32"
    return _expected(case, device, masked_rows, grads, accumulation)


def expected_for(inputs: Inputs, case: Case, masked_rows: str, grads: bool, accumulation: str = "fp32") -> Expected:
    """For given inputs of the case's shape (a sequence cut from a packed batch, a filled KV cache)."""
    out, ref_grads = _attention_and_grads(inputs, case, grads, masked_rows=masked_rows)
    out_err, grad_errs = 0.0, [0.0, 0.0, 0.0]
    classes = reference.length_classes(case, out.device)
    class_errs = [0.0] * len(classes or ())
    for precision in gradient_precisions(case.torch_dtype, accumulation) if grads else \
            yardstick_precisions(case.torch_dtype, accumulation):
        # the tensor-core rounding of P is one more variant of the two orders kernels use
        orders = reference.ORDERS if precision != "fp32_p" else ("scale_q", "exp2")
        for order in orders:
            p_out, p_grads = _attention_and_grads(inputs, case, grads, upcast=False, masked_rows=masked_rows,
                                                  order=order, precision=precision)
            if precision in yardstick_precisions(case.torch_dtype, accumulation):
                out_err = max(out_err, max_abs_error(p_out, out))
                class_errs = [max(e, max_abs_error(p_out[:, rows], out[:, rows]))
                              for e, (_, _, rows) in zip(class_errs, classes or ())]
            if grads:
                flash_grads = reference.flash_backward(inputs.q, inputs.k, inputs.v, inputs.dout, case,
                                                       masked_rows=masked_rows, order=order, precision=precision)
                grad_errs = [max(e, max_abs_error(g1, r), max_abs_error(g2, r))
                             for e, g1, g2, r in zip(grad_errs, p_grads, flash_grads, ref_grads)]
    magnitudes = reference.term_magnitudes(inputs.q, inputs.k, inputs.v, inputs.dout, case, masked_rows)
    out_classes = None
    if classes:
        row_terms = reference.output_row_magnitudes(inputs.q, inputs.k, inputs.v, case, masked_rows)
        out_classes = tuple(RowClass(lo, hi, rows, err, float(row_terms[rows].max()))
                            for (lo, hi, rows), err in zip(classes, class_errs))
    return Expected(out, out_err, magnitudes[0], magnitudes[4], ref_grads, tuple(grad_errs) if grads else None,
                    magnitudes[1:4] if grads else None, out_classes)
