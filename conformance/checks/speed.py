"""Speed regression: each benchmark case is timed (forward, and forward+backward where declared), its
own timed outputs are checked against the reference, and it is judged against the stored baseline for
this GPU architecture (conformance/speed.py holds the verdict; baselines.py the files).

The timed calls rotate over three input sets, and the last result of each set is held to the float64
reference on 64 of its query rows (forward output, and dq for forward+backward): a kernel that caches
results, hands back an input, or skips work when timed cannot post a good time.
"""

from __future__ import annotations

import torch

from conformance import baselines, speed, tiers
from conformance.backend import Backend, call
from conformance.case import Case
from conformance.expected import expected_for
from conformance.inputs import Inputs, make_inputs
from conformance.timing import summarize, time_calls
from conformance.tolerance import FORWARD_MULTIPLE, GRADIENT_MULTIPLE, compare
from conformance.verdict import Verdict

NAME = "speed"
NEEDS: tuple[str, ...] = ()
CASE_FEATURE = None  # the case feature the check exercises: every case (fuzzed too) has it
TOKENS = 16384  # batch x seqlen of every case: the same work per token at every length
CHECKED_ROWS = 64


def cases(tier: str) -> list[Case]:
    def case(n, d, dtype, causal):
        return Case(batch=max(1, TOKENS // n), seqlen_q=n, seqlen_k=n, nheads=16, head_dim=d, dtype=dtype,
                    causal="bottom_right" if causal else None, seed=1)

    quick = [case(n, 64, "bf16", c) for n in (4096,) for c in (False, True)]
    standard = [case(n, d, dt, c) for n in (1024, 4096, 16384) for d in (64, 128) for dt in ("fp16", "bf16")
                for c in (False, True)]
    full = [case(n, d, dt, c) for n in (2048, 8192, 32768) for d in (64, 128) for dt in ("fp16", "bf16")
            for c in (False, True)]
    return tiers.grid(tier, quick, standard, full)


def modes(backend: Backend) -> tuple[str, ...]:
    return ("fwd", "fwdbwd") if backend.capabilities.backward else ("fwd",)


def key(mode: str, case: Case) -> str:
    return f"{mode}:{case.id}"


def baseline_file(backend: Backend, device: str, options: dict):
    arch = baselines.arch_key(device)
    return baselines.path(options.get("baselines_dir", "baselines"), arch, backend.name), arch


def skip_reason(backend: Backend, case: Case, device: str, options: dict) -> str | None:
    """Why this case is not measured here (decided at collection, without running anything)."""
    if device != "cuda" and not options.get("allow_cpu_timing"):
        return "the speed check times CUDA devices (its baselines are per GPU architecture)"
    if options.get("gpu_shared_by", 1) > 1:
        return (f"this pytest-xdist worker shares its GPU with {options['gpu_shared_by'] - 1} other(s): timings would "
                "be wrong; run with no more workers (-n) than GPUs, or time in a run of its own")
    if options.get("update_baselines"):
        return None
    file, arch = baseline_file(backend, device, options)
    try:
        stored = baselines.load(file, arch)
    except baselines.BaselineError as exc:
        return str(exc)
    if stored is None or not any(key(m, case) in stored["cases"] for m in modes(backend)):
        return (f"no baseline for this case on {arch} ({file}); record one with "
                f"pytest --backend={backend.name} --check=speed --update-baselines")
    return None


def _check_rows(backend: Backend, case: Case, inputs: Inputs, out: torch.Tensor, dq, verdict: Verdict,
                mode: str) -> None:
    m = min(CHECKED_ROWS, case.seqlen_q)
    # A block of rows keeps its mask when cut from the end aligned to (bottom-right, and windows) or
    # from the start (top-left).
    rows = slice(0, m) if case.causal == "top_left" else slice(case.seqlen_q - m, case.seqlen_q)
    sub = case.replace(seqlen_q=m)
    own = Inputs(inputs.q[:, rows].detach(), inputs.k.detach(), inputs.v.detach(), inputs.dout[:, rows])
    exp = expected_for(own, sub, backend.capabilities.masked_rows, dq is not None)
    n = max(sub.seqlen_q, sub.seqlen_k)
    verdict.add("timed-output", compare(f"{mode} timed output (last {sub.seqlen_q} rows)", out[:, rows], exp.out,
                                        exp.out_torch_error, exp.out_magnitude, case.torch_dtype, FORWARD_MULTIPLE, n))
    if dq is not None:
        verdict.add("timed-output", compare(f"{mode} timed dq (last {sub.seqlen_q} rows)", dq[:, rows], exp.grads[0],
                                            exp.grad_torch_errors[0], exp.grad_magnitudes[0], case.torch_dtype,
                                            GRADIENT_MULTIPLE, n))


def measure(backend: Backend, case: Case, device: str, mode: str, verdict: Verdict) -> dict:
    """Time one mode of one case, with the reference kernel beside it; the timed results are
    checked into ``verdict``. Returns the baseline entry (``speed.record``) with TFLOP/s."""
    backward = mode == "fwdbwd"
    sets = [make_inputs(case.replace(seed=case.seed + s), device, requires_grad=backward, draw_on_device=True)
            for s in range(3)]

    def run(i):
        inputs = sets[i % 3]
        out = call(backend, inputs.q, inputs.k, inputs.v, case)
        if backward:
            out.backward(inputs.dout)
            return i % 3, out.detach(), inputs.q.grad
        return i % 3, out.detach(), None

    def reset(i):
        for t in (sets[i % 3].q, sets[i % 3].k, sets[i % 3].v):
            t.grad = None

    _, reference = speed.reference_kernel(device)
    samples, reference_samples, last = time_calls(run, device, before=reset if backward else None,
                                                  reference=reference)
    for index, out, dq in last:
        _check_rows(backend, case, sets[index], out, dq, verdict, mode)
    stats = speed.record(summarize(samples), summarize(reference_samples))
    tflops = speed.flops(case, mode) / (stats["median_ms"] * 1e9)
    peak = speed.peak_tflops(device)
    return {**stats, "tflops": tflops, "pct_of_peak": None if peak is None else 100 * tflops / peak}


def run(backend: Backend, case: Case, device: str, options: dict | None = None) -> Verdict:
    options = options or {}
    verdict = Verdict(NAME, backend.name, case, device)
    file, arch = baseline_file(backend, device, options)
    stored = baselines.load(file, arch)
    measured = {}
    for mode in modes(backend):
        m = measured[key(mode, case)] = measure(backend, case, device, mode, verdict)
        base = None if stored is None else stored["cases"].get(key(mode, case))
        if base is not None and not options.get("update_baselines"):
            judged = m["verdict"] = speed.judge(m, base)
            if judged["slower"]:
                verdict.fail("slower", f"{mode}: {100 * judged['absolute_change']:.1f}% slower than {file} "
                             f"(threshold {100 * judged['absolute_threshold']:.1f}%): median {m['median_ms']:.4f} ms "
                             f"(IQR {m['iqr_ms']:.4f}) vs baseline {base['median_ms']:.4f} ms (IQR {base['iqr_ms']:.4f}); "
                             f"relative to the reference kernel timed beside it {100 * judged['relative_change']:+.1f}%, "
                             f"the reference kernel itself {100 * judged['reference_change']:+.1f}% (a large change "
                             f"there means the GPU, not the kernel, moved: throttled or shared)")
    verdict.measurements.update(speed=measured, reference_kernel=speed.reference_kernel(device)[0],
                                baseline_file=str(file))
    if options.get("update_baselines") and verdict.passed:
        data = stored or {"schema": baselines.SCHEMA, "arch": arch, "backend": backend.name, "cases": {}}
        data.update(machine_info=baselines.machine_info(device), reference_kernel=speed.reference_kernel(device)[0])
        data["cases"].update(measured)
        baselines.save(file, data)
    return verdict
