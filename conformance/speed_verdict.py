"""Speed: FLOP counts, device peaks, the reference kernel, and the verdicts (pure functions of timings).

Why two gates. A/B in the same run (``judge_ab``) compares the kernel with another version of it timed
interleaved on the same GPU at the same moment: machine-to-machine and clock differences cancel, so its
threshold only has to clear the A/A spread. A stored baseline (``judge``) was recorded on another unit of
the same model, so its threshold adds the measured spread between units (MACHINE_SPREAD); it catches
large regressions, A/B the small ones. A stored entry that implies more than the device's peak (the
attention case or the reference matrix product) is refused, for recording and for judging: it was timed
wrongly. The reference kernel's ratio is reported, never gated: it does not normalise (on one H100 unit
cuDNN attention was 6.6% slower while the matrix product was 3.6% faster).
"""

from __future__ import annotations

import functools
import math
import os
import re
import statistics

import torch

from conformance.case import Case

# A/B: a case is slower when the candidate's change exceeds max(AB_FLOOR, 3 standard errors). The floor
# clears the largest A/A change measured on an H100 (see the README's gate table).
AB_FLOOR = 0.04
# Stored baselines: the measured spread between two H100 units of one model (cuDNN +6.6%, every run) is
# added to max(STORED_FLOOR, 3 standard errors of the change).
MACHINE_SPREAD = 0.07
STORED_FLOOR = 0.03
# Dense FP16/BF16 tensor-core peaks from NVIDIA's datasheets (TFLOP/s, without sparsity).
PEAK_TFLOPS = {"H100 80GB HBM3": 989.4, "H100 PCIe": 756.5, "H100 NVL": 835.5, "H200": 989.4, "A100": 312.0}
CPU_FLOP_PER_CYCLE, CPU_MAX_GHZ = 256, 6.0  # a generous bound: no CPU core does more


def flops(case: Case, mode: str) -> float:
    """4·B·H·Sq·Sk·D for the forward, halved for causal; the backward is 2.5 forwards."""
    forward = 4.0 * case.batch * case.nheads * case.seqlen_q * case.seqlen_k * case.head_dim
    forward *= 0.5 if case.causal else 1.0
    return forward * (3.5 if mode == "fwdbwd" else 1.0)


def peak_for(gpu_name: str | None) -> float | None:
    if not gpu_name:
        return None
    return next((peak for model, peak in PEAK_TFLOPS.items() if model in gpu_name), None)


def peak_tflops(device: str) -> float | None:
    """The device's dense half-precision peak; on the CPU a bound no core reaches; None if unknown."""
    if device != "cuda":
        return (os.cpu_count() or 1) * CPU_FLOP_PER_CYCLE * CPU_MAX_GHZ / 1e3
    return peak_for(torch.cuda.get_device_name())


@functools.cache
def reference_kernel(device: str):
    """The same-run yardstick: a bf16 4096³ matrix product on CUDA (float32 256³ on the CPU)."""
    n, dtype = (4096, torch.bfloat16) if device == "cuda" else (256, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return f"{dtype} matmul {n}^3", lambda: a @ b


def reference_flops(name: str | None) -> float | None:
    match = re.search(r"(\d+)\^3", name or "")
    return 2.0 * int(match.group(1)) ** 3 if match else None


def record(stats: dict, reference: dict, gpu: dict | None = None) -> dict:
    """A baseline entry: the case's statistics, the reference kernel's timed beside it, the GPU's state."""
    return {**stats, "ratio": stats["median_ms"] / reference["median_ms"],
            "reference_median_ms": reference["median_ms"], "reference_iqr_ms": reference["iqr_ms"],
            "reference_rounds": reference["rounds"], **({"gpu": gpu} if gpu else {})}


def implausible(entry: dict, case: Case, mode: str, peak: float | None, reference_name: str | None) -> str | None:
    """Why an entry cannot be a real timing (it implies more than the device's peak), or None."""
    if peak is None:
        return None
    problems = []
    if entry.get("median_ms", 0) > 0:
        tflops = flops(case, mode) / (entry["median_ms"] * 1e9)
        if tflops > peak:
            problems.append(f"the case's median {entry['median_ms']:.4f} ms implies {tflops:,.0f} TFLOP/s")
    ref = reference_flops(reference_name)
    if ref is not None and entry.get("reference_median_ms", 0) > 0:
        tflops = ref / (entry["reference_median_ms"] * 1e9)
        if tflops > peak:
            problems.append(f"the reference kernel's median {entry['reference_median_ms']:.4f} ms implies "
                            f"{tflops:,.0f} TFLOP/s")
    if any(entry.get(k, 1) <= 0 for k in ("median_ms", "reference_median_ms")):
        problems.append("a median of zero or less")
    return "; ".join(problems) + f", above the device's peak of {peak:,.0f} TFLOP/s" if problems else None


def _relative_se(median: float, iqr: float, rounds: int) -> float:
    """Relative standard error of a median: 1.253 sigma / sqrt(n), sigma estimated as IQR / 1.349."""
    return 1.253 * (iqr / 1.349) / (max(rounds, 1) ** 0.5) / median if median else 0.0


def judge(current: dict, baseline: dict) -> dict:
    """An entry (``record``) against its stored baseline entry: 'slower' when the median's change exceeds
    MACHINE_SPREAD + max(STORED_FLOOR, 3 standard errors). The change relative to the reference kernel
    is reported, not gated."""
    case_se = [_relative_se(e["median_ms"], e["iqr_ms"], e["rounds"]) for e in (current, baseline)]
    ref_se = [_relative_se(e["reference_median_ms"], e["reference_iqr_ms"], e.get("reference_rounds", e["rounds"]))
              for e in (current, baseline)]
    absolute = current["median_ms"] / baseline["median_ms"] - 1
    abs_threshold = MACHINE_SPREAD + max(STORED_FLOOR, 3 * math.hypot(*case_se))
    ratio_now, ratio_then = current["ratio"], baseline["ratio"]
    relative = ratio_now / ratio_then - 1
    rel_threshold = MACHINE_SPREAD + max(STORED_FLOOR, 3 * math.hypot(*case_se, *ref_se))
    absolute_slower, relative_slower = absolute > abs_threshold, relative > rel_threshold
    return {"absolute_change": absolute, "absolute_threshold": abs_threshold, "absolute_slower": absolute_slower,
            "relative_change": relative, "relative_threshold": rel_threshold, "relative_slower": relative_slower,
            "reference_change": current["reference_median_ms"] / baseline["reference_median_ms"] - 1,
            "slower": absolute_slower, "ratio": ratio_now, "baseline_ratio": ratio_then}


def judge_ab(candidate: list[float], candidate_rounds: list[int], against: list[float], against_rounds: list[int],
             floor: float = AB_FLOOR) -> dict:
    """The candidate against the version it is compared with, timed interleaved in rounds: per round the
    ratio of the two medians; the change is the median of those ratios (so a drift of the clocks between
    rounds cancels), its standard error 1.253 sigma / sqrt(rounds), sigma from the IQR of the log ratios.
    'slower' when the change exceeds max(floor, 3 standard errors)."""
    per_round = []
    for r in sorted(set(candidate_rounds) & set(against_rounds)):
        c = [s for s, k in zip(candidate, candidate_rounds) if k == r]
        a = [s for s, k in zip(against, against_rounds) if k == r]
        per_round.append(math.log(statistics.median(c) / statistics.median(a)))
    n = len(per_round)
    if n >= 4:
        q1, _, q3 = statistics.quantiles(per_round, n=4)
        se = 1.253 * ((q3 - q1) / 1.349) / n ** 0.5
    else:
        se = statistics.pstdev(per_round) if n > 1 else 0.0
    change = math.exp(statistics.median(per_round)) - 1
    threshold = max(floor, 3 * se)
    return {"change": change, "threshold": threshold, "se": se, "rounds": n, "slower": change > threshold,
            "candidate_median_ms": statistics.median(candidate), "against_median_ms": statistics.median(against)}
