"""Timing the way kernel engineers do: warm-up, many repeats, the median and its spread.

On CUDA each repeat flushes the L2 cache (zeroing a buffer larger than it) and queues a short GPU
sleep, so that the host has launched the whole call before the GPU reaches the start event (the
call's Python overhead is not timed, as in triton.testing.do_bench). The time runs to an end event
on the current stream; a device-wide synchronize follows, and when it ends later than its own latency
(measured on empty calls at the start of each measurement) explains, work went on on another stream
and the time runs to the synchronize instead, less that latency. (Subtracting the latency from every
call instead made calls of some 10 microseconds read as nearly zero on an H100: the latency's jitter
is of their size.) A reference
callable can be timed in two blocks, just before and just after the case's repeats, so that both see
the machine in the same state; not interleaved repeat by repeat, because on an H100 a large matrix
product right before each repeat slowed a 0.5 ms causal attention forward by up to 9% (its power
draw lowers the clocks the next kernel starts at). On the CPU, perf_counter around the call.
Statistics come from pytest-benchmark's ``Stats``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from pytest_benchmark.stats import Stats

L2_FLUSH_BYTES = 256 * 1024 * 1024  # above any current GPU's L2 (H100: 50 MB)
LAUNCH_SLACK_CYCLES = 2_000_000  # about 1 ms of GPU sleep at 2 GHz, ahead of each timed call


def summarize(samples_ms: list[float]) -> dict:
    stats = Stats()
    for sample in samples_ms:
        stats.update(sample)
    return {"median_ms": stats.median, "q1_ms": stats.q1, "q3_ms": stats.q3, "iqr_ms": stats.iqr,
            "min_ms": stats.min, "rounds": stats.rounds}


def _cuda_once(fn, flush, latency: tuple[float, float] | None = None) -> tuple[float, object]:
    """One timed call: the time to its end event on the current stream, unless a device-wide
    synchronize after it finished later than the synchronize's own latency (median, allowance) explains:
    then work went on elsewhere (a side stream), and the time runs to the synchronize, less its latency."""
    flush.zero_()
    torch.cuda._sleep(LAUNCH_SLACK_CYCLES)
    start, end, synced = (torch.cuda.Event(enable_timing=True) for _ in range(3))
    start.record()
    result = fn()
    end.record()
    torch.cuda.synchronize()  # device-wide: side streams included
    synced.record()
    synced.synchronize()
    on_stream, whole = start.elapsed_time(end), start.elapsed_time(synced)
    if latency is None:
        return whole - on_stream, result
    median, allowance = latency
    return (whole - median if whole - on_stream > median + allowance else on_stream), result


def _sync_latency_ms(flush) -> tuple[float, float]:
    """The synchronize's latency after an empty call: its median, and an allowance for its jitter
    (the spread from the median to the 90th percentile, plus 10 microseconds)."""
    samples = sorted(_cuda_once(lambda: None, flush)[0] for _ in range(30))
    median = samples[len(samples) // 2]
    return median, samples[26] - median + 0.01


def time_calls(fn: Callable[[int], object], device: str, *, warmup: int = 3, budget_s: float = 0.4,
               min_reps: int = 10, max_reps: int = 100, before: Callable[[int], None] | None = None,
               reference: Callable[[], object] | None = None, reference_reps: int = 15,
               ) -> tuple[list[float], list[float], list]:
    """Times ``fn(i)`` for repeat i; ``before(i)`` runs untimed first (resetting gradients, say), and
    ``reference()`` is timed ``reference_reps`` times before and as many after the repeats. Returns
    the samples in ms, the reference's samples, and the results of the last three repeats, to be
    checked."""
    cuda = device == "cuda"
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device="cuda") if cuda else None
    latency = _sync_latency_ms(flush) if cuda else None

    def timed(call):
        if cuda:
            return _cuda_once(call, flush, latency)
        t0 = time.perf_counter()
        result = call()
        return (time.perf_counter() - t0) * 1e3, result

    def once(i: int) -> tuple[float, object]:
        if before is not None:
            before(i)
        return timed(lambda: fn(i))

    def reference_block() -> list[float]:
        return [timed(reference)[0] for _ in range(reference_reps)] if reference is not None else []

    for i in range(warmup):
        once(i)
    reference_block()  # its warm-up
    first, _ = once(warmup)
    reps = max(min_reps, min(max_reps, int(budget_s * 1e3 / max(first, 1e-3))))
    reference_samples = reference_block()
    samples, last = [], []
    for i in range(reps):
        elapsed, result = once(i)
        samples.append(elapsed)
        last = (last + [result])[-3:]
    return samples, reference_samples + reference_block(), last
