"""Measurements that must run where the kernel runs: its process holds the CUDA allocator whose peak
is read and the stream whose time is taken. Each returns plain numbers; the checks judge them in the
judge's process. A kernel that patches this module can fake its numbers (it runs in the same
process), but not the verdict on its outputs, which the judge checks itself.
"""

from __future__ import annotations

from conformance import memory
from conformance.backend import Backend, call
from conformance.case import Case
from conformance.inputs import make_inputs


def memory_peak(backend: Backend, case: Case, device: str, backward: bool) -> int:
    """Peak extra bytes of one forward (and backward) of ``case``, inputs drawn on the device."""
    inputs = make_inputs(case, device, requires_grad=backward, draw_on_device=True)

    def work():
        out = call(backend, inputs.q, inputs.k, inputs.v, case)
        if backward:
            out.backward(inputs.dout)
        return out

    return memory.peak_extra_bytes(work, device)


PROCEDURES = {"memory_peak": memory_peak}
