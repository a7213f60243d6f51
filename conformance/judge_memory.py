"""CUDA memory of the judge's own, in segments no kernel's process can reach.

A CUDA tensor shared with the kernel's process (its inputs, over CUDA IPC) opens there the whole
cudaMalloc segment it lies in, and the caching allocator puts other blocks of the judge in the same
segment: a cached reference, the judge's copy of a reply. A kernel that writes through raw pointers
could change them (a reference made to agree with its output; a timed output corrected after the judge
copied it, by work left running in its process). What the judge keeps to judge with is allocated in a
memory pool of its own (torch.cuda.MemPool), whose segments no tensor sent to a kernel lies in.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

_POOLS: dict[int, torch.cuda.MemPool] = {}  # per device index, for the run


@contextlib.contextmanager
def private(device: torch.device):
    """Allocations of this thread on ``device`` made in the judge's own pool (on a CUDA device)."""
    if device.type != "cuda":
        yield
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _POOLS:
        with torch.cuda.device(index):
            _POOLS[index] = torch.cuda.MemPool()
    with torch.cuda.use_mem_pool(_POOLS[index], index):
        yield


def kept(value):
    """``value`` with each CUDA tensor in it (tuples, lists, dicts and dataclasses followed) copied into the
    judge's own pool; anything else as it is."""
    if isinstance(value, torch.Tensor):
        if not value.is_cuda:
            return value
        with private(value.device):
            return value.clone()
    if isinstance(value, (tuple, list)):
        return type(value)(kept(v) for v in value)
    if isinstance(value, dict):
        return {k: kept(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: kept(getattr(value, f.name))
                                             for f in dataclasses.fields(value) if f.init})
    return value
