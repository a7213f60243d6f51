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
    grads: tuple[torch.Tensor, ...] | None  # float64 dq, dk, dv
    grad_torch_errors: tuple[float, ...] | None
    grad_magnitudes: tuple[float, ...] | None


def _attention_and_grads(inputs: Inputs, case: Case, grads: bool, upcast: bool = True, **kwargs):
    """Output (and dq, dk, dv) of the formula; float64 leaves when ``upcast``, so gradients stay float64."""
    dtype = torch.float64 if upcast else case.torch_dtype
    leaves = tuple(t.detach().to(dtype).requires_grad_(grads) for t in (inputs.q, inputs.k, inputs.v))
    with torch.enable_grad():
        out = reference.attention(*leaves, case, upcast=upcast, **kwargs)
        if not grads:
            return out.detach(), None
        return out.detach(), torch.autograd.grad(out, leaves, inputs.dout.to(dtype))


@functools.lru_cache(maxsize=1)
def expected(case: Case, device: str, masked_rows: str, grads: bool) -> Expected:
    """For the case's own inputs (``inputs.make_inputs``)."""
    return expected_for(make_inputs(case, device), case, masked_rows, grads)


def expected_for(inputs: Inputs, case: Case, masked_rows: str, grads: bool) -> Expected:
    """For given inputs of the case's shape (a sequence cut from a packed batch, a filled KV cache)."""
    out, ref_grads = _attention_and_grads(inputs, case, grads, masked_rows=masked_rows)
    out_err, grad_errs = 0.0, [0.0, 0.0, 0.0]
    for order in reference.ORDERS:
        p_out, p_grads = _attention_and_grads(inputs, case, grads, upcast=False, masked_rows=masked_rows, order=order)
        out_err = max(out_err, max_abs_error(p_out, out))
        if grads:
            flash_grads = reference.flash_backward(inputs.q, inputs.k, inputs.v, inputs.dout, case,
                                                   masked_rows=masked_rows, order=order)
            grad_errs = [max(e, max_abs_error(g1, r), max_abs_error(g2, r))
                         for e, g1, g2, r in zip(grad_errs, p_grads, flash_grads, ref_grads)]
    magnitudes = reference.term_magnitudes(inputs.q, inputs.k, inputs.v, inputs.dout, case, masked_rows)
    return Expected(out, out_err, magnitudes[0], ref_grads, tuple(grad_errs) if grads else None,
                    magnitudes[1:] if grads else None)
