"""CUDA memory of the judge's own, in segments no kernel's process can reach.

A CUDA tensor shared with the kernel's process (its inputs, over CUDA IPC) opens there the whole
cudaMalloc segment it lies in, and the caching allocator puts other blocks of the judge in the same
segment: a cached reference, the judge's copy of a reply, a copy kept across a second call. A kernel
that writes through raw pointers could change them (a reference made to agree with its output; a first
output made equal to the second; its inputs and their pristine copies changed alike). What the judge
keeps to judge with is allocated in a memory pool of its own (torch.cuda.MemPool), whose segments no
tensor sent to a kernel lies in.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import threading

import torch

_POOLS: dict[int, torch.cuda.MemPool] = {}  # per device index; dropped by ``release``
_LOCK = threading.Lock()
_ROUTED = threading.local()  # this thread's devices routed to the pool now (torch refuses a second routing)


@contextlib.contextmanager
def private(device: torch.device):
    """Allocations of this thread on ``device`` made in the judge's own pool (on a CUDA device; nested
    uses keep the outer routing)."""
    if device.type != "cuda":
        yield
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    routed = getattr(_ROUTED, "devices", None) or set()
    if index in routed:
        yield
        return
    with _LOCK:
        if index not in _POOLS:
            with torch.cuda.device(index):
                _POOLS[index] = torch.cuda.MemPool()
        pool = _POOLS[index]
    _ROUTED.devices = routed | {index}
    try:
        with torch.cuda.use_mem_pool(pool, index):
            yield
    finally:
        _ROUTED.devices = routed


def _copy(tensor: torch.Tensor) -> torch.Tensor:
    try:
        with private(tensor.device):
            return tensor.detach().clone()
    except torch.OutOfMemoryError:  # the pool cannot take from the default pool's cache: return that first
        torch.cuda.empty_cache()
        with private(tensor.device):
            return tensor.detach().clone()


def _mapped(value, tensor):
    """``value`` with ``tensor`` applied to each tensor in it (tuples, lists, dicts, dataclasses followed)."""
    if isinstance(value, torch.Tensor):
        return tensor(value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple
        return type(value)(*(_mapped(v, tensor) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_mapped(v, tensor) for v in value)
    if isinstance(value, dict):
        return {k: _mapped(v, tensor) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        result = copy.copy(value)
        for f in dataclasses.fields(value):
            object.__setattr__(result, f.name, _mapped(getattr(value, f.name), tensor))
        return result
    return value


def kept(value):
    """``value`` with each CUDA tensor in it moved into the judge's own pool (a copy); CPU tensors as they
    are: for what the judge made itself and keeps (a cached reference)."""
    return _mapped(value, lambda t: _copy(t) if t.is_cuda else t)


def copied(value):
    """``value`` with each tensor in it copied, a CUDA tensor into the judge's own pool: for what the judge
    takes from the kernel or keeps across a call into it (a reply as it arrives, an earlier output, a
    pristine copy of inputs)."""
    return _mapped(value, lambda t: _copy(t) if t.is_cuda else t.detach().clone())


def release() -> None:
    """Let torch free the pools' unused memory at its next empty_cache: each pool is dropped (a new one is
    made when next needed), since torch frees a pool only once nothing holds it. Tensors in it stay valid."""
    with _LOCK:
        _POOLS.clear()
