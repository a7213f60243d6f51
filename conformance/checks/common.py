"""Pieces several checks share: the gradient comparison and the tolerance-free masked-keys test."""

from __future__ import annotations

import torch

from conformance import diagnosis, judge_memory, reference
from conformance.backend import Backend, call
from conformance.case import Case
from conformance.checks.forward import output_comparison
from conformance.expected import GRAD_NAMES, expected
from conformance.inputs import make_inputs
from conformance.tolerance import GRADIENT_MULTIPLE, compare
from conformance.verdict import Verdict


def compare_gradients(backend: Backend, case: Case, device: str, verdict: Verdict) -> None:
    """dq, dk, dv of the backend's backward against float64 autograd, each under the tolerance rule."""
    inputs = make_inputs(case, device, requires_grad=True)
    out = call(backend, inputs.q, inputs.k, inputs.v, case)
    if not out.requires_grad:
        verdict.fail("backward", "output is not differentiable (no autograd graph) although backward is declared")
        return
    grads = torch.autograd.grad(out, (inputs.q, inputs.k, inputs.v), inputs.dout)
    pristine = make_inputs(case, device)  # a backward may not write into its inputs either (a training step's weights)
    for name, got, want in zip(("q", "k", "v", "dout"), (inputs.q, inputs.k, inputs.v, inputs.dout),
                               (pristine.q, pristine.k, pristine.v, pristine.dout)):
        if not bool(bitwise_equal(got.detach(), want).all()):
            verdict.fail("inputs-unmodified", f"the backward modified its input {name} in place")
    exp = expected(case, device, backend.capabilities.masked_rows, True, backend.capabilities.accumulation)
    comparisons = [compare(name, grad, ref, err, mag, case.torch_dtype, GRADIENT_MULTIPLE,
                           max(case.seqlen_q, case.seqlen_k), exp.logit_magnitude)
                   for name, grad, ref, err, mag in zip(GRAD_NAMES, grads, exp.grads, exp.grad_torch_errors,
                                                        exp.grad_magnitudes)]
    if not verdict.findings and not all(c.passed for c in comparisons):  # once per case: not if the output was
        found = diagnosis.diagnose_gradients(case, grads, backend.capabilities.masked_rows, comparisons)
        comparisons = [c if c.passed else diagnosis.diagnosed(c, found) for c in comparisons]
    for name, comparison in zip(GRAD_NAMES, comparisons):
        verdict.add(name, comparison)


def against_reference(backend: Backend, case: Case, device: str, verdict: Verdict, prop: str) -> None:
    """The output (as ``prop``) and, where the backend has a backward, dq, dk, dv against the reference."""
    verdict.add(prop, output_comparison(backend, case, device))
    if backend.capabilities.backward:
        compare_gradients(backend, case, device, verdict)


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise: equal, or both NaN."""
    return (a == b) | (torch.isnan(a) & torch.isnan(b))


def _cut(case: Case) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Keys to perturb, and the queries that may see none of them: the complement of one query's key
    range (the middle query's, else the first's), and every query whose range lies inside it."""
    lo, hi = reference.key_range(case)
    seen_any = lo <= hi
    for row in (case.seqlen_q // 2, 0):
        if not seen_any[row]:
            continue
        keys = torch.ones(case.seqlen_k, dtype=torch.bool)
        keys[int(lo[row]): int(hi[row]) + 1] = False
        if keys.any():
            return keys, seen_any & (lo >= lo[row]) & (hi <= hi[row])
    return None


def masked_keys_do_not_matter(backend: Backend, case: Case, device: str, verdict: Verdict, prop: str) -> None:
    """Needing no tolerance: keys and values a query may not attend to (its future, outside its window)
    are replaced by other numbers, and that query's output must not change by a single bit."""
    cut = _cut(case)
    if cut is None:
        return
    keys, rows = cut
    inputs = make_inputs(case, device)
    out = judge_memory.copied(call(backend, inputs.q, inputs.k, inputs.v, case))  # the next call may reuse its buffer
    with torch.no_grad():  # in place, so the layout (views, strides) is kept
        gen = torch.Generator().manual_seed(case.seed + 7)
        for t in (inputs.k, inputs.v):
            fresh = torch.randn(t[:, keys.to(t.device)].shape, generator=gen) * 8
            t[:, keys.to(t.device)] = fresh.to(t.device, t.dtype)
    again = call(backend, inputs.q, inputs.k, inputs.v, case)
    rows = rows.to(out.device)
    same = bitwise_equal(out[:, rows], again[:, rows])
    if not bool(same.all()):
        changed = (~same).flatten(2).any(-1).any(0).nonzero().flatten()
        first = int(torch.nonzero(rows).flatten()[int(changed[0])])
        verdict.fail(prop, f"keys/values at {int(keys.sum())} positions are masked for {int(rows.sum())} query rows; "
                           f"changing them changed the output of {changed.numel()} of those rows, first row {first}")
