"""Shows the speed gate works, on a GPU: a baseline is recorded for a few cases; then the unchanged
backend is measured again N times (false alarms counted), and test-only wrappers that add known extra
work (+10%, +25% of the case's median, as a GPU sleep after the call) are measured N times each
(detections counted). Also compares the suite's median with triton.testing.do_bench's for the same call,
the two measured alternately. The GPU is warmed up (2 s of the case) before anything is recorded.
Usage: python tools/speed_gate.py BACKEND [RERUNS]"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time

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


def pct(x: float) -> str:
    return f"{100 * x:+.1f}%"


def main(name: str, reruns: int) -> None:
    backend = registry.load(name)
    cycles = sleep_cycles_per_ms()
    print(f"backend {name}; {reruns} reruns per variant; GPU sleep calibrated at {cycles / 1e6:.3f} Mcycles/ms")
    for case in speed_check.cases("quick"):  # seqlen 4096, head dim 64, bf16: non-causal and causal
        inputs = make_inputs(case, "cuda", draw_on_device=True)
        fn = lambda: call(backend, inputs.q, inputs.k, inputs.v, case)  # noqa: E731
        warm_until = time.time() + 2.0
        while time.time() < warm_until:
            fn()
            torch.cuda.synchronize()
        pairs = [(measured(backend, case)["median_ms"], triton.testing.do_bench(fn, return_mode="median"))
                 for _ in range(5)]
        fidelity = statistics.median(suite / bench - 1 for suite, bench in pairs)
        print(f"{case.id}: suite/do_bench median {pct(fidelity)} over 5 alternations "
              f"({', '.join(f'{a:.4f}/{b:.4f}' for a, b in pairs)} ms)")
        base = measured(backend, case)
        print(f"  baseline median {base['median_ms']:.4f} ms (IQR {base['iqr_ms']:.4f}), reference kernel "
              f"{base['reference_median_ms']:.4f} ms")
        for extra in (0.0, 0.10, 0.25):
            variant = slowed(backend, extra * base["median_ms"], cycles) if extra else backend
            judged = [speed.judge(measured(variant, case), base) for _ in range(reruns)]
            flagged = sum(j["slower"] for j in judged)
            print(f"  +{100 * extra:.0f}% work: flagged {flagged}/{reruns} (absolute alone {sum(j['absolute_slower'] for j in judged)}, "
                  f"relative alone {sum(j['relative_slower'] for j in judged)}); changes absolute "
                  f"{' '.join(pct(j['absolute_change']) for j in judged)}; relative "
                  f"{' '.join(pct(j['relative_change']) for j in judged)}; reference kernel "
                  f"{' '.join(pct(j['reference_change']) for j in judged)}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 10)
