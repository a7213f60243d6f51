"""Measurements that must run where the kernel runs: its process holds the CUDA allocator whose peak
is read and the stream whose time is taken. Each returns plain numbers; the checks judge them in the
judge's process. A kernel that patches this module can fake its numbers (it runs in the same
process), but not the verdict on its outputs, which the judge checks itself.
"""

from __future__ import annotations

import contextlib

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


_timing = False


def timing() -> bool:
    """Whether the calls made now are the speed check's (``timed``, around checks/speed.py ``time_case``).
    A compiled backend of ours compiles those for the timed shapes, as a model of fixed shapes runs, and
    its other calls once per variant for every shape (backends/flex.py)."""
    return _timing


@contextlib.contextmanager
def timed():
    """The calls made inside are timed (``timing``)."""
    global _timing
    _timing = True
    try:
        yield
    finally:
        _timing = False


def speed_time(backend: Backend, against: str | None, sets: list[Inputs], case: Case, device: str, mode: str,
               blocks: list[slice], timing: dict) -> dict:
    """The speed check's timing (checks/speed.py ``time_case``) of ``backend``, and of the backend named
    ``against`` interleaved with it, on the judge's input sets; returns the samples and the kept rows."""
    from conformance.checks.speed import time_case

    backends = {"candidate": backend, **({"against": registry.load(against)} if against else {})}
    backward = mode == "fwdbwd"
    sets = [Inputs(*(t.requires_grad_(backward) for t in (s.q, s.k, s.v)), s.dout) for s in sets]
    return time_case(backends, sets, case, device, mode, blocks, **timing)


def _seed(seed: int, device) -> None:
    """What torch.manual_seed does to the generators a kernel on ``device`` draws from (the CPU's, and
    CUDA's for a CUDA tensor), without its cost where a device is not initialised: torch queues that
    device's seeding with a formatted stack trace, about 3 ms a call (CUDA on a CPU machine; XPU and MTIA
    everywhere), which was most of the dropout check's time on the CPU."""
    import torch

    if device.type not in ("cpu", "cuda"):
        torch.manual_seed(seed)
        return
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(seed)


def dropout_samples(backend: Backend, q, k, v, case: Case, dropout_p: float, seeds: list) -> "torch.Tensor":
    """The outputs of one call per seed with ``dropout_p``, torch's generators (CPU and CUDA, which
    dropout kernels draw from) seeded with it just before: (len(seeds), *q.shape). A seed of None
    leaves the generators as they are."""
    import torch

    outs = []
    for seed in seeds:
        if seed is not None:
            _seed(seed, q.device)
        outs.append(call(backend, q, k, v, case, dropout_p=dropout_p).detach().clone())
    return torch.stack(outs)


def dropout_with_mask(backend: Backend, q, k, v, dout, case: Case, dropout_p: float, seed: int,
                      grad: bool = True) -> tuple:
    """One call with ``dropout_p`` under ``seed``, its inputs requiring grad and its gradients taken where
    ``grad`` (out, dq, dk, dv), else none requiring grad (out); then the same call (grad or not alike)
    once per slice of head_dim keys with V replaced by the identity basis on that slice (v[:, s + i, :, i]
    = 1), whose outputs are that slice's columns of the dropped probability matrix: the dropout mask the
    first call used, (batch, seqlen_q, nheads, seqlen_k), where the mask depends on the seed alone."""
    import torch

    def seeded(values, backward):
        _seed(seed, q.device)
        leaves = tuple(t.detach().clone().requires_grad_(grad) for t in (q, k, values))
        with torch.enable_grad():
            out = call(backend, *leaves, case, dropout_p=dropout_p)
            grads = torch.autograd.grad(out, leaves, dout) if backward else ()
        return (out.detach(), *(g.detach() for g in grads))

    first = seeded(v, grad and backend.capabilities.backward)
    sk, d = v.shape[1], v.shape[-1]
    revealed = torch.empty((*first[0].shape[:3], sk), dtype=first[0].dtype, device=first[0].device)
    for start in range(0, sk, d):
        width = min(d, sk - start)
        basis = torch.zeros_like(v)
        basis[:, start + torch.arange(width), :, torch.arange(width)] = 1
        revealed[..., start: start + width] = seeded(basis, False)[0][..., :width]
    return (*first, revealed)


# Run in a process started for their case (under process isolation): a timing must not depend on what the
# run's earlier cases compiled or autotuned there (compiled flex, after other shapes, runs its dynamic-shape
# kernel: causal forward 0.42 ms -> 0.58 ms at 4096 tokens on an H200), only on the case. Each maps its
# arguments to what the process may be kept for: the next such procedure with the same key (the case's other
# mode, a confirmation measurement), nothing else having run there in between. A process start costs
# seconds (torch's import, CUDA's initialisation, a compiled kernel's compilation).
FRESH = {"speed_time": lambda against, sets, case, *rest: (against, case.id)}

PROCEDURES = {"memory_peak": memory_peak, "speed_time": speed_time, "dropout_samples": dropout_samples,
              "dropout_with_mask": dropout_with_mask}
