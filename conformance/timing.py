"""Timing the way kernel engineers do: warm-up, many repeats, the median and its spread.

Why each step: each CUDA repeat flushes the L2 cache and queues a short GPU sleep, so the call's host
overhead is not timed (as in triton.testing.do_bench); a device-wide synchronize after each call catches
work left on a side stream (then the time runs to the synchronize, less its measured latency). The GPU
is warmed up until its SM clock settles, and clock, power and temperature are read before and after,
so a number recorded or judged says what state the GPU was in. Several callables (a kernel and the
version it is compared with) are timed interleaved, in short blocks in alternating order (ABBA), so
that all of them see the same clocks; a reference callable is timed in blocks just before and after,
not interleaved (on an H100 a large matrix product right before a repeat slowed a 0.5 ms attention
forward by up to 9%). This module times and keeps what the caller asks to keep; it judges nothing.
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


def _timer(device: str) -> Callable[[Callable[[], object]], tuple[float, object]]:
    """Times one call, returning (ms, its result): CUDA events with the L2 flush, the launch slack and the
    side-stream check (``_cuda_once``) on CUDA, perf_counter on the CPU."""
    if device == "cuda":
        flush = _flush_buffer()
        latency = _sync_latency_ms(flush)
        return lambda call: _cuda_once(call, flush, latency)

    def timed(call):
        t0 = time.perf_counter()
        result = call()
        return (time.perf_counter() - t0) * 1e3, result
    return timed


def time_calls(fn: Callable[[int], object], device: str, *, warmup: int = 3, budget_s: float = 0.4,
               min_reps: int = 10, max_reps: int = 100, before: Callable[[int], None] | None = None,
               reference: Callable[[], object] | None = None, reference_reps: int = 15,
               ) -> tuple[list[float], list[float], list]:
    """Times ``fn(i)`` for repeat i; ``before(i)`` runs untimed first (resetting gradients, say), and
    ``reference()`` is timed ``reference_reps`` times before and as many after the repeats. Returns
    the samples in ms, the reference's samples, and the results of the last three repeats, to be
    checked."""
    timed = _timer(device)

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


def gpu_state(device: str) -> dict:
    """The GPU's SM clock (MHz), power draw (W) and temperature (C) now, through NVML; {} without."""
    if device != "cuda":
        return {}
    try:
        return {"sm_clock_mhz": torch.cuda.clock_rate(), "power_w": round(torch.cuda.power_draw() / 1000, 1),
                "temperature_c": torch.cuda.temperature()}
    except Exception:  # noqa: BLE001 - NVML (nvidia-ml-py) missing or refused: the state is informative
        return {}


_FLUSH: list = []
_SETTLED_ONCE: list = []
SETTLE_FIRST_S = 1.5  # the first measurement in a process warms the GPU up at least this long
SETTLE_S = 0.05  # every later one at least this long
SETTLE_MAX_S = 1.0  # a clock that never settles (power-capped) is recorded as such
SETTLE_WINDOW_S = 0.025
SETTLE_TOLERANCE = 0.02  # the clock has settled when three readings a window apart agree to 2%


def _flush_buffer():
    if not _FLUSH:
        _FLUSH.append(torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device="cuda"))
    return _FLUSH[0]


def settle(step: Callable[[], object], device: str, min_s: float | None = None, max_s: float = SETTLE_MAX_S) -> dict:
    """Runs ``step`` until the SM clock is steady (three readings 25 ms apart within 2%) and at least
    ``min_s`` have passed (longer for the process's first measurement). Returns how long it took, the
    last readings, and whether the clock settled (None where it cannot be read)."""
    if device != "cuda":
        return {"settle_s": 0.0, "settled": None}
    if min_s is None:
        min_s = SETTLE_S if _SETTLED_ONCE else SETTLE_FIRST_S
    max_s = max(max_s, min_s + 0.5)
    t0, clocks = time.perf_counter(), []
    while True:
        window = time.perf_counter()
        while time.perf_counter() - window < SETTLE_WINDOW_S:
            step()
            torch.cuda.synchronize()
        clock = gpu_state(device).get("sm_clock_mhz")
        clocks.append(clock)
        elapsed = time.perf_counter() - t0
        last = clocks[-3:]
        steady = None if clock is None else (len(last) == 3 and max(last) - min(last) <= SETTLE_TOLERANCE * max(last))
        if elapsed >= max_s or (elapsed >= min_s and steady is not False):
            _SETTLED_ONCE.append(True)
            return {"settle_s": round(elapsed, 3), "settled": steady, "clock_readings_mhz": last}


def rounds_of(reps: int) -> list[int]:
    """How many repeats of each callable go into each block: about eight blocks, at least two repeats each."""
    size = max(2, round(reps / 8))
    return [size] * (reps // size) + ([reps % size] if reps % size else [])


def time_interleaved(calls: dict[str, Callable[[int], object]], device: str, *, budget_s: float = 0.15,
                     min_reps: int = 10, max_reps: int = 40, before: Callable[[int], None] | None = None,
                     keep: Callable[[str, int, object], object] | None = None,
                     reference: Callable[[], object] | None = None, reference_reps: int = 15,
                     settle_min_s: float | None = None) -> dict:
    """Times each ``calls[label](i)`` (i counting that label's repeats), interleaved in blocks: round r
    runs a block of each label, in the labels' order on even rounds and reversed on odd ones (ABBA), after
    a warm-up of all of them until the clock settles. ``before(i)`` runs untimed before each call, and
    ``keep(label, i, result)``, untimed after it, returns what to keep of the result (the caller checks
    those later). Returns plain data: per label its samples (ms) and the round of each, the kept items in
    call order, the reference's samples (a block before and one after), and the GPU's state."""
    timed = _timer(device)
    labels = list(calls)

    def once(label: str, i: int) -> tuple[float, object]:
        if before is not None:
            before(i)
        return timed(lambda: calls[label](i))

    def reference_block() -> list[float]:
        return [timed(reference)[0] for _ in range(reference_reps)] if reference is not None else []

    for i in range(2):
        for label in labels:
            once(label, i)
    warm = settle(lambda: [once(label, 0) for label in labels], device, settle_min_s)
    state_before = gpu_state(device)
    reference_block()  # its warm-up
    first = max(once(label, 0)[0] for label in labels)
    reps = max(min_reps, min(max_reps, int(budget_s * 1e3 / max(first, 1e-3))))
    reference_samples = reference_block()
    samples = {label: [] for label in labels}
    rounds = {label: [] for label in labels}
    kept = {label: [] for label in labels}
    for r, size in enumerate(rounds_of(reps)):
        for label in (labels if r % 2 == 0 else labels[::-1]):
            for _ in range(size):
                i = len(samples[label])
                elapsed, result = once(label, i)
                samples[label].append(elapsed)
                rounds[label].append(r)
                if keep is not None:
                    kept[label].append(keep(label, i, result))
                del result
    reference_samples += reference_block()
    return {"samples": samples, "rounds": rounds, "kept": kept, "reference_samples": reference_samples,
            "gpu": {"before": state_before, "after": gpu_state(device), **warm}}
