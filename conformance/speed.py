"""Speed: FLOP counts, the reference kernel every case is also measured against, and the
noise-aware per-case verdict against a stored baseline.

The verdict is judged twice. Absolute: the case's median against the baseline's. Relative: the
case's median divided by the median of a reference kernel (a dense matrix product) measured in the
same run, against the same ratio in the baseline; clock and thermal drift between runs moves both
and cancels in the ratio. The relative verdict gates (fails the case); the absolute one is reported.
A case is slower when its change exceeds the larger of MIN_SLOWDOWN and twice the relative spread
(IQR / median) of the two measurements, averaged.
"""

from __future__ import annotations

import functools

import torch

from conformance.case import Case
from conformance.timing import summarize, time_calls

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
def reference_kernel(device: str) -> dict:
    """The same-run yardstick: a bf16 8192³ matrix product on CUDA (float32 512³ on the CPU)."""
    n, dtype = (8192, torch.bfloat16) if device == "cuda" else (512, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    samples, _ = time_calls(lambda i: a @ b, device, budget_s=0.3)
    return {"name": f"{dtype} matmul {n}^3", **summarize(samples)}


def record(stats: dict, reference: dict) -> dict:
    """A baseline entry: the case's statistics with the reference kernel measured in the same run."""
    return {**stats, "ratio": stats["median_ms"] / reference["median_ms"],
            "reference_median_ms": reference["median_ms"], "reference_iqr_ms": reference["iqr_ms"]}


def judge(current: dict, baseline: dict) -> dict:
    """Both verdicts for one entry (``record``) against its baseline entry; 'slower' is the gating one."""
    def rel_spread(median, iqr):
        return iqr / median if median else 0.0

    case_spread = rel_spread(current["median_ms"], current["iqr_ms"]) + rel_spread(baseline["median_ms"],
                                                                                    baseline["iqr_ms"])
    absolute = current["median_ms"] / baseline["median_ms"] - 1
    abs_threshold = max(MIN_SLOWDOWN, case_spread)
    ratio_now, ratio_then = current["ratio"], baseline["ratio"]
    relative = ratio_now / ratio_then - 1
    rel_threshold = max(MIN_SLOWDOWN, case_spread + rel_spread(current["reference_median_ms"], current["reference_iqr_ms"])
                        + rel_spread(baseline["reference_median_ms"], baseline["reference_iqr_ms"]))
    return {"absolute_change": absolute, "absolute_threshold": abs_threshold, "absolute_slower": absolute > abs_threshold,
            "relative_change": relative, "relative_threshold": rel_threshold, "slower": relative > rel_threshold,
            "ratio": ratio_now, "baseline_ratio": ratio_then}
