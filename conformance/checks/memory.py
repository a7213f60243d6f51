"""Long-sequence memory: the peak extra memory of the forward, and of forward+backward, at growing
sequence lengths; the growth exponent is fitted and compared with the declared memory class. A backend
declared linear whose memory grows quadratically fails, with the measured curve in the message.
Out of memory at a length is a measurement ("OOM at 32768"), not an error; so is a length past the
time limit. The longest length within ``--memory-budget`` is reported.
"""

from __future__ import annotations

import time

from conformance import grid, memory_meter, tiers
from conformance.backend import Backend, OutOfMemory, run_kernel_side
from conformance.case import Case
from conformance.options import RunOptions
from conformance.checks.check import Check
from conformance.verdict import Verdict

NAME = "memory"
NEEDS: tuple[str, ...] = ()
CASE_FEATURE = None  # the case feature the check exercises: every case (fuzzed too) has it
LINEAR_LIMIT = 1.5  # a backend declared linear fails above this exponent
TIME_LIMIT_S = 60.0  # a length whose measurement takes longer ends the sweep


# One head group as the lab's GPT-2 Medium has. The quick tier's templates are nominally bf16 (on the CPU
# PyTorch's bf16 matmul is 30-50x faster than its fp16 one), the standard tier adds fp16; a backend
# without the nominal dtype gets one it declares.
BASE = Case(batch=1, seqlen_q=1024, seqlen_k=1024, nheads=16, head_dim=64, dtype="bf16")


def intents() -> list[grid.Intent]:
    """Templates, realised in each backend's declared dtype and head dim; the sweep sets the lengths."""
    return [grid.intent("memory growth", BASE),
            grid.intent("memory growth, causal", BASE.replace(causal="bottom_right")),
            grid.intent("memory growth, fp16, head dim 128", BASE.replace(head_dim=128, dtype="fp16"), 1)]


def cases(tier: str) -> list[Case]:
    return grid.nominal(intents(), tier)


def _sweep(backend: Backend, case: Case, device: str, lengths, backward: bool) -> tuple[list, str | None]:
    points, stopped = [], None
    for n in lengths:
        start = time.perf_counter()
        try:
            peak = run_kernel_side(backend, "memory_peak", case.replace(seqlen_q=n, seqlen_k=n), device, backward)
        except OutOfMemory:  # a measurement, not an error
            return points, f"OOM at {n}"
        points.append((n, peak))
        if time.perf_counter() - start > TIME_LIMIT_S:
            return points, f"stopped after {n}: one measurement took over {TIME_LIMIT_S:g} s"
    return points, stopped


def run(backend: Backend, case: Case, device: str, options: RunOptions | None = None) -> Verdict:
    options = options or RunOptions()
    verdict = Verdict(NAME, backend.name, case, device)
    lengths = tiers.get(options.tier).sweep(device)
    budget = options.memory_budget_gb
    for mode in ("fwd", "fwdbwd") if backend.capabilities.backward else ("fwd",):
        points, stopped = _sweep(backend, case, device, lengths, mode == "fwdbwd")
        if not points:  # nothing measured is no pass: an out-of-memory result of its own
            raise OutOfMemory(f"{mode}: {stopped or 'no length measured'} (the sweep's first length)")
        result = {"curve": [[n, b] for n, b in points], "stopped": stopped}
        curve = ", ".join(f"{n}: {b / 2**20:.1f} MiB" for n, b in points) + (f", {stopped}" if stopped else "")
        if len(points) >= 2:
            exponent = memory_meter.growth_exponent(points[-3:])
            result.update(exponent=exponent, measured_class=memory_meter.memory_class(exponent))
            if backend.capabilities.memory == "linear" and exponent > LINEAR_LIMIT:
                verdict.fail("memory-growth", f"{mode}: declared linear, but peak extra memory grows as N^{exponent:.2f} "
                                              f"({result['measured_class']}): {curve}")
        if budget:
            within = [n for n, b in points if b <= budget * 2**30]
            result["longest_within_budget"] = max(within) if within else None
        result["text"] = curve
        verdict.measurements[mode] = result
    return verdict


CHECK = Check(NAME, cases, run, needs=NEEDS, feature=CASE_FEATURE, measures=True, intents=intents)
