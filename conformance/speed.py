"""Speed: FLOP counts, the reference kernel every case is also measured against, and the
noise-aware per-case verdict against a stored baseline.

The verdict is judged twice. Absolute: the case's median against the baseline's. Relative: the
case's median divided by the median of a reference kernel (a dense matrix product) timed just before
and just after the case's repeats, against the same ratio in the baseline. The absolute verdict gates
(fails the case); the relative one and the reference kernel's own change are reported beside it, so a
failure on a throttled or shared GPU shows that the machine moved too. Why absolute: measured on an
H100 (tools/speed_gate.py, flash-attn, 24 reruns per variant), the absolute verdict caught 24 of 24
runs with 10% extra work and raised no false alarm in 24 unchanged runs; the relative one caught only
19 of 24, because the matrix product drifts more than attention does (its median moved by up to 17%
between runs of unchanged code, the attention kernel's by under 2%). Each is slower when its change
exceeds the larger of MIN_SLOWDOWN and three standard errors of the change, each median's standard
error estimated as 1.253 * (IQR / 1.349) / sqrt(rounds).
"""

from __future__ import annotations

import functools

import torch

from conformance.case import Case

MIN_SLOWDOWN = 0.05
# Dense FP16/BF16 tensor-core peaks from NVIDIA's datasheets (TFLOP/s, without sparsity).
PEAK_TFLOPS = {"H100 80GB HBM3": 989.4, "H100 PCIe": 756.5, "H100 NVL": 835.5, "H200": 989.4, "A100": 312.0}


def flops(case: Case, mode: str) -> float:
    """4·B·H·Sq·Sk·D for the forward, halved for causal; the backward is 2.5 forwards."""
    forward = 4.0 * case.batch * case.nheads * case.seqlen_q * case.seqlen_k * case.head_dim
    forward *= 0.5 if case.causal else 1.0
    return forward * (3.5 if mode == "fwdbwd" else 1.0)


def peak_tflops(device: str) -> float | None:
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((peak for model, peak in PEAK_TFLOPS.items() if model in name), None)


@functools.cache
def reference_kernel(device: str):
    """The same-run yardstick: a bf16 4096³ matrix product on CUDA (float32 256³ on the CPU)."""
    n, dtype = (4096, torch.bfloat16) if device == "cuda" else (256, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return f"{dtype} matmul {n}^3", lambda: a @ b


def record(stats: dict, reference: dict) -> dict:
    """A baseline entry: the case's statistics with the reference kernel's, timed beside it."""
    return {**stats, "ratio": stats["median_ms"] / reference["median_ms"],
            "reference_median_ms": reference["median_ms"], "reference_iqr_ms": reference["iqr_ms"],
            "reference_rounds": reference["rounds"]}


def _relative_se(median: float, iqr: float, rounds: int) -> float:
    """Relative standard error of a median: 1.253 sigma / sqrt(n), sigma estimated as IQR / 1.349."""
    return 1.253 * (iqr / 1.349) / (max(rounds, 1) ** 0.5) / median if median else 0.0


def judge(current: dict, baseline: dict) -> dict:
    """Both verdicts for one entry (``record``) against its baseline entry; 'slower' (absolute) gates."""
    case_se = [_relative_se(e["median_ms"], e["iqr_ms"], e["rounds"]) for e in (current, baseline)]
    ref_se = [_relative_se(e["reference_median_ms"], e["reference_iqr_ms"], e.get("reference_rounds", e["rounds"]))
              for e in (current, baseline)]
    absolute = current["median_ms"] / baseline["median_ms"] - 1
    abs_threshold = max(MIN_SLOWDOWN, 3 * sum(x * x for x in case_se) ** 0.5)
    ratio_now, ratio_then = current["ratio"], baseline["ratio"]
    relative = ratio_now / ratio_then - 1
    rel_threshold = max(MIN_SLOWDOWN, 3 * sum(x * x for x in case_se + ref_se) ** 0.5)
    absolute_slower, relative_slower = absolute > abs_threshold, relative > rel_threshold
    return {"absolute_change": absolute, "absolute_threshold": abs_threshold, "absolute_slower": absolute_slower,
            "relative_change": relative, "relative_threshold": rel_threshold, "relative_slower": relative_slower,
            "reference_change": current["reference_median_ms"] / baseline["reference_median_ms"] - 1,
            "slower": absolute_slower, "ratio": ratio_now, "baseline_ratio": ratio_then}
