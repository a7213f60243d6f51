"""Shows the speed gate works, on a GPU: a baseline is recorded for a few cases; then the unchanged
backend is measured again N times (false alarms counted), and test-only wrappers that add known extra
work (+10%, +25% of the case's median, as a GPU sleep after the call) are measured N times each
(detections counted). Also compares the suite's median with triton.testing.do_bench's for the same call.
Usage: python tools/speed_gate.py BACKEND [RERUNS]"""

from __future__ import annotations

import dataclasses
import sys

import torch
import triton.testing

from conformance import registry, speed
from conformance.backend import call
from conformance.checks import speed as speed_check
from conformance.inputs import make_inputs
from conformance.verdict import Verdict


def sleep_cycles_per_ms() -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(10_000_000)
    start.record()
    torch.cuda._sleep(100_000_000)
    end.record()
    end.synchronize()
    return 100_000_000 / start.elapsed_time(end)


def slowed(backend, extra_ms: float, cycles_per_ms: float):
    cycles = int(extra_ms * cycles_per_ms)

    def fn(*args, **kwargs):
        out = backend.fn(*args, **kwargs)
        torch.cuda._sleep(cycles)  # known extra work, on the same stream
        return out

    return dataclasses.replace(backend, name=f"{backend.name}+{extra_ms:.3f}ms", fn=fn)


def measured(backend, case) -> dict:
    verdict = Verdict("speed", backend.name, case, "cuda")
    entry = speed_check.measure(backend, case, "cuda", "fwd", verdict)
    assert verdict.passed, verdict.message()
    return entry


def main(name: str, reruns: int) -> None:
    backend = registry.load(name)
    cycles = sleep_cycles_per_ms()
    print(f"backend {name}; {reruns} reruns per variant; GPU sleep calibrated at {cycles / 1e6:.3f} Mcycles/ms")
    for case in speed_check.cases("quick"):  # seqlen 4096, head dim 64, bf16: non-causal and causal
        base = measured(backend, case)
        inputs = make_inputs(case, "cuda")
        bench = triton.testing.do_bench(lambda: call(backend, inputs.q, inputs.k, inputs.v, case), return_mode="median")
        print(f"{case.id}: baseline median {base['median_ms']:.4f} ms (IQR {base['iqr_ms']:.4f}); do_bench median "
              f"{bench:.4f} ms, suite/do_bench {100 * (base['median_ms'] / bench - 1):+.2f}%")
        for extra in (0.0, 0.10, 0.25):
            variant = slowed(backend, extra * base["median_ms"], cycles) if extra else backend
            flagged, changes = 0, []
            for _ in range(reruns):
                judged = speed.judge(measured(variant, case), base)
                flagged += judged["slower"]
                changes.append(judged["relative_change"])
            changes.sort()
            print(f"  +{100 * extra:.0f}% work: flagged {flagged}/{reruns}; relative change median "
                  f"{100 * changes[len(changes) // 2]:+.1f}% (range {100 * changes[0]:+.1f}% .. {100 * changes[-1]:+.1f}%)")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 10)
