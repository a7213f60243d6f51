"""Peak extra memory of a call, and the growth exponent of a sweep over sequence lengths.

On CUDA the caching allocator's own statistics: peak allocated bytes during the call above what was
allocated before it (reset, synchronize). On the CPU a TorchDispatchMode sees every operator's output
storage as it is made and, through a finalizer on the storage, when it is freed: live bytes and their
peak. Views and in-place results share a storage and are counted once; a kernel's internal scratch that
never leaves the operator is invisible to it, which is why the GPU reading comes from the allocator.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveStorageBytes(TorchDispatchMode):
    """Live bytes of the storages created while the mode is active, and their peak."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen: weakref.WeakSet = weakref.WeakSet()

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage not in self._seen:
                    self._seen.add(storage)
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, storage.nbytes())
        return out


def peak_extra_bytes(fn: Callable[[], object], device: str) -> int:
    """Peak bytes allocated while ``fn`` runs, beyond what was allocated before it."""
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        result = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        del result
        return peak
    meter = LiveStorageBytes()
    with meter:
        result = fn()
    del result
    return meter.peak


def growth_exponent(points: list[tuple[int, int]]) -> float:
    """Least-squares slope of log(bytes) against log(seqlen)."""
    xs = [math.log(n) for n, _ in points]
    ys = [math.log(max(b, 1)) for _, b in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def memory_class(exponent: float) -> str:
    """linear below 1.3, quadratic above 1.6, in between 'superlinear'."""
    return "linear" if exponent < 1.3 else "quadratic" if exponent > 1.6 else "superlinear"
