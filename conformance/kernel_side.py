"""Measurements that must run where the kernel runs: its process holds the CUDA allocator whose peak
is read and the stream whose time is taken. Each returns plain numbers; the checks judge them in the
judge's process. A kernel that patches this module can fake its numbers (it runs in the same
process), but not the verdict on its outputs, which the judge checks itself.
"""

from __future__ import annotations

from conformance import memory_meter, registry
from conformance.backend import Backend, call
from conformance.case import Case
from conformance.inputs import Inputs, make_inputs


def memory_peak(backend: Backend, case: Case, device: str, backward: bool) -> int:
    """Peak extra bytes of one forward (and backward) of ``case``, inputs drawn on the device."""
    inputs = make_inputs(case, device, requires_grad=backward, draw_on_device=True)

    def work():
        out = call(backend, inputs.q, inputs.k, inputs.v, case)
        if backward:
            out.backward(inputs.dout)
        return out

    return memory_meter.peak_extra_bytes(work, device)


def speed_time(backend: Backend, against: str | None, sets: list[Inputs], case: Case, device: str, mode: str,
               blocks: list[slice], timing: dict) -> dict:
    """The speed check's timing (checks/speed.py ``time_case``) of ``backend``, and of the backend named
    ``against`` interleaved with it, on the judge's input sets; returns the samples and the kept rows."""
    from conformance.checks.speed import time_case

    backends = {"candidate": backend, **({"against": registry.load(against)} if against else {})}
    backward = mode == "fwdbwd"
    sets = [Inputs(*(t.requires_grad_(backward) for t in (s.q, s.k, s.v)), s.dout) for s in sets]
    return time_case(backends, sets, case, device, mode, blocks, **timing)


def dropout_samples(backend: Backend, q, k, v, case: Case, dropout_p: float, seeds: list) -> "torch.Tensor":
    """The outputs of one call per seed with ``dropout_p``, torch's generators (CPU and CUDA, which
    dropout kernels draw from) seeded with it just before: (len(seeds), *q.shape). A seed of None
    leaves the generators as they are."""
    import torch

    outs = []
    for seed in seeds:
        if seed is not None:
            torch.manual_seed(seed)
        outs.append(call(backend, q, k, v, case, dropout_p=dropout_p).detach().clone())
    return torch.stack(outs)


def dropout_with_mask(backend: Backend, q, k, v, dout, case: Case, dropout_p: float, seed: int) -> tuple:
    """One call with ``dropout_p`` under ``seed`` and its gradients (out, dq, dk, dv), then the same call
    with V replaced by the identity basis (v[:, j, :, j] = 1; head_dim >= seqlen_k), whose output is the
    dropped probability matrix itself: the dropout mask the first call used."""
    import torch

    def seeded(values):
        torch.manual_seed(seed)
        leaves = tuple(t.detach().clone().requires_grad_(True) for t in (q, k, values))
        with torch.enable_grad():
            out = call(backend, *leaves, case, dropout_p=dropout_p)
            grads = torch.autograd.grad(out, leaves, dout) if backend.capabilities.backward else ()
        return (out.detach(), *(g.detach() for g in grads))

    basis = torch.zeros_like(v)
    sk = v.shape[1]
    basis[:, torch.arange(sk), :, torch.arange(sk)] = 1
    return (*seeded(v), seeded(basis)[0])


PROCEDURES = {"memory_peak": memory_peak, "speed_time": speed_time, "dropout_samples": dropout_samples,
              "dropout_with_mask": dropout_with_mask}
