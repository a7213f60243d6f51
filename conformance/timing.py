"""Timing the way kernel engineers do: warm-up, many repeats, the median and its spread.

On CUDA each repeat flushes the L2 cache (zeroing a buffer larger than it), then times the call with
device events, the end event recorded after a device-wide synchronize so that work a kernel leaves on
a side stream is counted. On the CPU, perf_counter around the call. Statistics come from
pytest-benchmark's ``Stats`` (median, quartiles, IQR).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from pytest_benchmark.stats import Stats

L2_FLUSH_BYTES = 256 * 1024 * 1024  # above any current GPU's L2 (H100: 50 MB)


def summarize(samples_ms: list[float]) -> dict:
    stats = Stats()
    for sample in samples_ms:
        stats.update(sample)
    return {"median_ms": stats.median, "q1_ms": stats.q1, "q3_ms": stats.q3, "iqr_ms": stats.iqr,
            "min_ms": stats.min, "rounds": stats.rounds}


def time_calls(fn: Callable[[int], object], device: str, *, warmup: int = 3, budget_s: float = 0.4,
               min_reps: int = 10, max_reps: int = 100, before: Callable[[int], None] | None = None
               ) -> tuple[list[float], list]:
    """Times ``fn(i)`` for repeat i; ``before(i)`` runs untimed first (resetting gradients, say).
    Returns the samples in ms and the results of the last three repeats, to be checked."""
    cuda = device == "cuda"
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device="cuda") if cuda else None

    def once(i: int) -> tuple[float, object]:
        if before is not None:
            before(i)
        if cuda:
            flush.zero_()
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = fn(i)
            torch.cuda.synchronize()  # device-wide: side streams included
            end.record()
            end.synchronize()
            return start.elapsed_time(end), result
        t0 = time.perf_counter()
        result = fn(i)
        return (time.perf_counter() - t0) * 1e3, result

    for i in range(warmup):
        once(i)
    first, _ = once(warmup)
    reps = max(min_reps, min(max_reps, int(budget_s * 1e3 / max(first, 1e-3))))
    samples, last = [], []
    for i in range(reps):
        elapsed, result = once(i)
        samples.append(elapsed)
        last = (last + [result])[-3:]
    return samples, last
