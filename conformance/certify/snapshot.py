"""The performance snapshot: forward and forward+backward time, TFLOP/s and peak extra memory against
sequence length for every usable backend (the naive one until it runs out of memory), and which
kernels actually ran and their share of the time (torch.profiler), so a silent fallback shows."""

from __future__ import annotations

import torch

from conformance import memory_meter, speed_verdict
from conformance.backend import OutOfMemory, call, classify
from conformance.case import Case
from conformance.inputs import make_inputs
from conformance.timing import summarize, time_calls


def _point(backend, case: Case, device: str) -> dict:
    point = {"seqlen": case.seqlen_q}
    for mode in ("fwd", "fwdbwd") if backend.capabilities.backward else ("fwd",):
        inputs = make_inputs(case, device, requires_grad=mode == "fwdbwd", draw_on_device=True)

        def run(i, inputs=inputs, mode=mode):
            out = call(backend, inputs.q, inputs.k, inputs.v, case)
            if mode == "fwdbwd":
                out.backward(inputs.dout)
            return None

        def reset(i, inputs=inputs):
            for t in (inputs.q, inputs.k, inputs.v):
                t.grad = None

        samples, _, _ = time_calls(run, device, warmup=1, budget_s=0.15, min_reps=3, max_reps=30, before=reset)
        stats = summarize(samples)
        ms = stats["median_ms"]
        point[f"{mode}_ms"] = ms
        point[f"{mode}_q1_ms"], point[f"{mode}_q3_ms"] = stats["q1_ms"], stats["q3_ms"]  # the spread
        point[f"{mode}_tflops"] = speed_verdict.flops(case, mode) / (ms * 1e9)
        reset(0)
        point[f"{mode}_peak_bytes"] = memory_meter.peak_extra_bytes(lambda: run(0), device)
    return point


def curve(backend, lengths, device: str, dtype: str, heads: int = 16, head_dim: int = 64,
          slow_ms: float = float("inf")) -> dict:
    """Points until the first out-of-memory, which is marked, not raised, or a call slower than slow_ms."""
    points, oom = [], None
    for n in lengths:
        case = Case(batch=1, seqlen_q=n, seqlen_k=n, nheads=heads, head_dim=head_dim, dtype=dtype, seed=9)
        if backend.capabilities.not_supported_reasons(case, device):
            break
        try:
            points.append(_point(backend, case, device))
            if max(points[-1]["fwd_ms"], points[-1].get("fwdbwd_ms", 0.0)) > slow_ms:
                return {"points": points, "oom_at": None, "stopped": f"stopped after {n}: a call took over {slow_ms:g} ms"}
        except Exception as exc:  # noqa: BLE001 - out of memory is a measurement
            if classify(exc) is not OutOfMemory:
                return {"points": points, "oom_at": None, "error": f"{type(exc).__name__}: {exc}"[:300]}
            oom = n
            break
        finally:
            if device == "cuda":
                torch.cuda.empty_cache()
    return {"points": points, "oom_at": oom}


def kernels(backend, device: str, dtype: str, seqlen: int, top: int = 6) -> list[dict]:
    """The kernels (CUDA) or operators (CPU) one forward+backward runs, by share of device time."""
    from torch.profiler import ProfilerActivity, profile

    case = Case(batch=1, seqlen_q=seqlen, seqlen_k=seqlen, nheads=16, head_dim=64, dtype=dtype, seed=9)
    inputs = make_inputs(case, device, requires_grad=backend.capabilities.backward, draw_on_device=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        out = call(backend, inputs.q, inputs.k, inputs.v, case)
        if backend.capabilities.backward:
            out.backward(inputs.dout)
        if device == "cuda":
            torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if (e.device_type.name == "CUDA") == (device == "cuda")]
    attr = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    total = sum(getattr(e, attr) for e in events) or 1.0
    ranked = sorted(events, key=lambda e: getattr(e, attr), reverse=True)[:top]
    return [{"name": e.key[:120], "share": getattr(e, attr) / total, "calls": e.count} for e in ranked]
