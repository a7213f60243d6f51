"""Speed regression: each benchmark case is timed (forward, and forward+backward where declared) and
judged, either against another version of the kernel timed interleaved in the same run
(``--speed-against``, the recommended gate) or against the stored baseline for this GPU model.

The kernel-side step (``time_case``) only times and keeps a block of rows of every timed call's
output; it runs in the kernel's process (kernel_side.speed_time). The judge-side steps (``check_timed``,
conformance/speed_verdict.py's verdicts) choose which calls to check after timing, hold them to the
float64 reference, check the input sets were left unchanged, and judge the timings. So a kernel that
caches results, hands back an input, scribbles on its inputs or skips work when timed cannot post a
good time.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch

from conformance import baselines, features, registry, speed_verdict, tiers
from conformance.backend import Backend, call, run_kernel_side
from conformance.case import Case
from conformance.checks.check import Check
from conformance.expected import expected_for
from conformance.options import RunOptions
from conformance.inputs import Inputs, make_inputs
from conformance.timing import summarize, time_interleaved
from conformance.tolerance import FORWARD_MULTIPLE, GRADIENT_MULTIPLE, compare
from conformance.verdict import Verdict

NAME = "speed"
NEEDS: tuple[str, ...] = ()
CASE_FEATURE = None  # the case feature the check exercises: every case (fuzzed too) has it
TOKENS = 16384  # batch x seqlen of every case: the same work per token at every length
CHECKED_ROWS = 64
INPUT_SETS = 3
CHECKED_CALLS = 3  # per input set and backend, drawn after timing


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


def modes(backend: Backend, against: Backend | None = None) -> tuple[str, ...]:
    backward = backend.capabilities.backward and (against is None or against.capabilities.backward)
    return ("fwd", "fwdbwd") if backward else ("fwd",)


def key(mode: str, case: Case) -> str:
    return f"{mode}:{case.id}"


def baseline_file(backend: Backend, device: str, options: RunOptions):
    arch = baselines.arch_key(device)
    return baselines.path(options.baselines_dir, arch, backend.name), arch


def against_backend(options: RunOptions) -> Backend | None:
    """The backend of ``--speed-against`` (a registered name or an import string), or None."""
    spec = options.speed_against
    if not spec or options.update_baselines:
        return None
    # described by the kernel's process when the session runs one (the judge never loads a kernel)
    return options.speed_against_backend or registry.load(spec)


def skip_reason(backend: Backend, case: Case, device: str, options: RunOptions) -> str | None:
    """Why this case is not measured here (decided at collection, without running anything)."""
    if device != "cuda" and not options.allow_cpu_timing:
        return "the speed check times CUDA devices (its baselines are per GPU architecture)"
    if options.gpu_shared_by > 1:
        return (f"this pytest-xdist worker shares its GPU with {options.gpu_shared_by - 1} other(s): timings would "
                "be wrong; run with no more workers (-n) than GPUs, or time in a run of its own")
    if options.update_baselines and not options.missing_baselines_only:
        return None
    if options.speed_against and not options.update_baselines:
        try:
            against = against_backend(options)
        except registry.BackendNotFound as exc:
            return f"--speed-against: {exc}"
        reasons = against.capabilities.not_supported_reasons(case, device, NEEDS)
        return f"--speed-against={against.name} cannot run this case: {'; '.join(reasons)}" if reasons else None
    file, arch = baseline_file(backend, device, options)
    try:
        stored = baselines.load(file, arch)
    except baselines.BaselineError as exc:
        return str(exc)
    if options.update_baselines:  # --update-missing-baselines
        if stored is not None and all(key(m, case) in stored["cases"] for m in modes(backend)):
            return (f"its baseline is stored already ({file}); --update-missing-baselines records the cases without "
                    "one, --update-baselines times every case again")
        return None
    if stored is None or not any(key(m, case) in stored["cases"] for m in modes(backend)):
        return (f"no baseline for this case on {arch} ({file}); record one with "
                f"pytest --backend={backend.name} --check=speed --update-baselines, or compare with the previous "
                f"version in the same run: --speed-against=BACKEND")
    return None


# -- the rows checked --------------------------------------------------------------------------------
@dataclass(frozen=True)
class RowBlock:
    """A block of query rows of a case, with the keys those rows can see and the sub-case they form."""
    start: int
    rows: int
    keys: int
    sub: Case

    @property
    def slice(self) -> slice:
        return slice(self.start, self.start + self.rows)


def row_block(case: Case, rng) -> RowBlock:
    """A block of CHECKED_ROWS query rows at a random place. A causal block sees a prefix of the keys, and
    is the bottom-right-aligned case of those rows and keys. Cases with other masks keep the block whose
    mask is unchanged when cut: the last rows (bottom-right) or the first (top-left)."""
    sq, sk = case.seqlen_q, case.seqlen_k
    m = min(CHECKED_ROWS, sq)
    plain = not features.present(case)
    if plain and case.causal is None:
        start = rng.randrange(sq - m + 1)
        return RowBlock(start, m, sk, case.replace(seqlen_q=m))
    if plain:
        shift = sk - sq if case.causal == "bottom_right" else 0  # row r sees keys j <= r + shift
        lo, hi = max(0, -shift), min(sq - m, sk - m - shift)  # every row sees a key, and no more than sk
        if lo <= hi:
            start = rng.randrange(lo, hi + 1)
            keys = start + m + shift
            return RowBlock(start, m, keys, case.replace(seqlen_q=m, seqlen_k=keys, causal="bottom_right"))
    start = 0 if case.causal == "top_left" else sq - m
    return RowBlock(start, m, sk, case.replace(seqlen_q=m))


# -- kernel side -------------------------------------------------------------------------------------
def input_sets(case: Case, device: str, mode: str) -> list[Inputs]:
    return [make_inputs(case.replace(seed=case.seed + s), device, requires_grad=mode == "fwdbwd",
                        draw_on_device=True) for s in range(INPUT_SETS)]


def time_case(backends: dict[str, Backend], sets: list[Inputs], case: Case, device: str, mode: str,
              blocks: list[slice], **timing) -> dict:
    """Kernel side: times each backend on the input sets in rotation (interleaved when there are
    several), with the reference kernel beside them, and keeps rows ``blocks[s]`` of every timed call's
    output (and dq) on set s. Returns plain data (``timing.time_interleaved``'s), ``kept`` holding per
    backend label, in call order, (input set, output rows, dq rows or None)."""
    backward = mode == "fwdbwd"

    def caller(backend: Backend):
        def run(i):
            inputs = sets[i % len(sets)]
            out = call(backend, inputs.q, inputs.k, inputs.v, case)
            if backward:
                out.backward(inputs.dout)
                return out, inputs.q.grad
            return out, None
        return run

    def reset(i):
        for t in (sets[i % len(sets)].q, sets[i % len(sets)].k, sets[i % len(sets)].v):
            t.grad = None

    def keep(label, i, result):
        s = i % len(sets)
        out, dq = result
        return s, out[:, blocks[s]].detach().clone(), None if dq is None else dq[:, blocks[s]].clone()

    from conformance import kernel_side

    _, reference = speed_verdict.reference_kernel(device)
    with kernel_side.timed():  # what a compiled backend of ours compiles for the timed shape (backends/flex.py)
        return time_interleaved({label: caller(b) for label, b in backends.items()}, device,
                                before=reset if backward else None, keep=keep, reference=reference, **timing)


# -- judge side --------------------------------------------------------------------------------------
def check_timed(timed: dict, backends: dict[str, Backend], case: Case, mode: str, pristine: list[Inputs],
                sets: list[Inputs], blocks: list[RowBlock], verdict: Verdict, rng=None) -> None:
    """Judge side, outputs: the input sets must be as they were before timing, and CHECKED_CALLS timed
    calls per input set and backend, drawn now (after timing), must match the float64 reference on their
    kept rows (forward output, and dq for forward+backward)."""
    rng = rng or secrets.SystemRandom()
    for s, (now, before) in enumerate(zip(sets, pristine)):
        changed = now.to(before.q.device).differing(before)
        if changed:
            verdict.fail("inputs-modified", f"{mode}: input set {s}'s {', '.join(changed)} changed while timed: "
                                            f"a backend wrote into its inputs")
    expected = {}
    for label, backend in backends.items():
        kept = timed["kept"][label]
        for s, block in enumerate(blocks):
            on_set = [i for i, item in enumerate(kept) if item[0] == s]
            for i in sorted(rng.sample(on_set, min(CHECKED_CALLS, len(on_set)))):
                _, out, dq = kept[i]
                masked, acc = backend.capabilities.masked_rows, backend.capabilities.accumulation
                if (s, masked, acc) not in expected:
                    p = pristine[s]
                    own = Inputs(p.q[:, block.slice], p.k[:, :block.keys], p.v[:, :block.keys],
                                 p.dout[:, block.slice]).to(sets[s].q.device)
                    expected[s, masked, acc] = expected_for(own, block.sub, masked, dq is not None, acc)
                exp = expected[s, masked, acc]
                n = max(block.sub.seqlen_q, block.sub.seqlen_k)
                what = f"{mode} timed call {i} of {label} {backend.name}, rows {block.start}-{block.start + block.rows - 1}"
                verdict.add("timed-output", compare(f"{what}: output", out, exp.out, exp.out_torch_error,
                                                    exp.out_magnitude, case.torch_dtype, FORWARD_MULTIPLE, n,
                                                    exp.logit_magnitude, at=(0, block.start)))
                if dq is not None:
                    verdict.add("timed-output", compare(f"{what}: dq", dq, exp.grads[0], exp.grad_torch_errors[0],
                                                        exp.grad_magnitudes[0], case.torch_dtype, GRADIENT_MULTIPLE, n,
                                                        exp.logit_magnitude, at=(0, block.start)))


def measure(backends: dict[str, Backend], case: Case, device: str, mode: str, verdict: Verdict,
            **timing) -> dict:
    """Both sides in one process: input sets and secret row blocks, the kernel-side timing, the
    judge-side output checks. Returns the timed data with ``entries``: per label the baseline entry
    (``speed_verdict.record``) with TFLOP/s and the GPU's state."""
    rng = secrets.SystemRandom()
    sets = input_sets(case, device, mode)
    # kept on the host, out of the kernel's reach: on a GPU it maps the whole cudaMalloc segment of each input
    # sent to it, where a clone made here could lie too, and one changed with the inputs would hide the change
    pristine = [s.to("cpu") for s in sets]
    blocks = [row_block(case, rng) for _ in sets]
    if set(backends) <= {"candidate", "against"}:
        against = backends.get("against")
        # the kernel side runs where the kernel runs (its process: kernel_side.speed_time), on these input sets
        timed = run_kernel_side(backends["candidate"], "speed_time", None if against is None else against.name, sets,
                                case, device, mode, [b.slice for b in blocks], timing)
    else:  # several versions of one kernel in this process (tools/speed_gate.py)
        timed = time_case(backends, sets, case, device, mode, [b.slice for b in blocks], **timing)
    check_timed(timed, backends, case, mode, pristine, sets, blocks, verdict, rng)
    timed.pop("kept")
    reference = summarize(timed["reference_samples"])
    peak = speed_verdict.peak_tflops(device)
    timed["entries"] = {}
    for label in backends:
        entry = speed_verdict.record(summarize(timed["samples"][label]), reference, timed["gpu"])
        tflops = speed_verdict.flops(case, mode) / (entry["median_ms"] * 1e9)
        timed["entries"][label] = {**entry, "tflops": tflops, "pct_of_peak": None if peak is None else 100 * tflops / peak}
    return timed


def gpu_text(gpu: dict | None) -> str:
    state = (gpu or {}).get("after") or (gpu or {}).get("before") or {}
    if not state:
        return "GPU state not read (no NVML)"
    return (f"GPU at {state.get('sm_clock_mhz')} MHz, {state.get('power_w')} W, {state.get('temperature_c')} C"
            f"{'' if (gpu or {}).get('settled') is not False else ' (clock not settled)'}")


def _judge_ab(backend: Backend, against: Backend, case: Case, device: str, mode: str, verdict: Verdict,
              timing: dict) -> dict:
    pair = {"candidate": backend, "against": against}
    tries = []
    for _ in range(2):  # a flagged case is measured again (a confirmation run); both must be slower
        timed = measure(pair, case, device, mode, verdict, **timing)
        judged = speed_verdict.judge_ab(timed["samples"]["candidate"], timed["rounds"]["candidate"],
                                timed["samples"]["against"], timed["rounds"]["against"])
        tries.append((timed, judged))
        if not judged["slower"]:
            break
    timed, judged = tries[-1]
    if all(j["slower"] for _, j in tries) and len(tries) == 2:
        first = tries[0][1]
        verdict.fail("slower", f"{mode}: {100 * judged['change']:.1f}% slower than --speed-against={against.name}, "
                     f"timed interleaved in the same run (threshold {100 * judged['threshold']:.1f}%: max(A/A floor "
                     f"{100 * speed_verdict.AB_FLOOR:.0f}%, 3 standard errors)); medians {judged['candidate_median_ms']:.4f} vs "
                     f"{judged['against_median_ms']:.4f} ms over {judged['rounds']} rounds; first measurement "
                     f"{100 * first['change']:+.1f}%, confirmed by a second; {gpu_text(timed['gpu'])}")
    return {**timed["entries"]["candidate"], "against": timed["entries"]["against"], "ab": judged,
            "ab_first": tries[0][1] if len(tries) == 2 else None}


def _judge_stored(backend: Backend, case: Case, device: str, mode: str, verdict: Verdict, file, stored: dict,
                  base: dict, timing: dict) -> dict:
    tries = []
    for _ in range(2):  # a flagged case is measured again (a confirmation run); both must be slower
        timed = measure({"candidate": backend}, case, device, mode, verdict, **timing)
        entry = timed["entries"]["candidate"]
        judged = speed_verdict.judge(entry, base)
        tries.append((entry, judged))
        if not judged["slower"]:
            break
    entry, judged = tries[-1]
    if len(tries) == 2 and judged["slower"]:
        base_gpu = (base.get("gpu") or {}).get("after") or {}
        verdict.fail("slower", f"{mode}: {100 * judged['absolute_change']:.1f}% slower than {file} "
                     f"(threshold {100 * judged['absolute_threshold']:.1f}%, of which {100 * speed_verdict.MACHINE_SPREAD:.0f}% "
                     f"for the spread between GPUs of one model): median {entry['median_ms']:.4f} ms "
                     f"(IQR {entry['iqr_ms']:.4f}) vs baseline {base['median_ms']:.4f} ms (IQR {base['iqr_ms']:.4f}); "
                     f"first measurement {100 * tries[0][1]['absolute_change']:+.1f}%, confirmed by a second; "
                     f"{gpu_text(entry.get('gpu'))}; baseline recorded at {base_gpu.get('sm_clock_mhz')} MHz, "
                     f"{base_gpu.get('power_w')} W; relative to the reference kernel "
                     f"{100 * judged['relative_change']:+.1f}%, the reference kernel itself "
                     f"{100 * judged['reference_change']:+.1f}% (reported, not gated). For a gate that does not "
                     f"depend on the machine, compare with the previous version in the same run: --speed-against")
    return {**entry, "verdict": judged, "first_verdict": tries[0][1] if len(tries) == 2 else None}


def run(backend: Backend, case: Case, device: str, options: RunOptions | None = None) -> Verdict:
    options = options or RunOptions()
    verdict = Verdict(NAME, backend.name, case, device)
    timing = options.speed_timing
    against = against_backend(options)
    file, arch = baseline_file(backend, device, options)
    update = options.update_baselines
    stored = None if against is not None else baselines.load(file, arch)
    reference_name = speed_verdict.reference_kernel(device)[0]
    peak = options.peak_tflops or speed_verdict.peak_tflops(device)
    measured = {}
    for mode in modes(backend, against):
        k = key(mode, case)
        base = None if stored is None or update else stored["cases"].get(k)
        if against is not None:
            measured[k] = _judge_ab(backend, against, case, device, mode, verdict, timing)
        elif base is not None:
            stored_peak = speed_verdict.peak_for((stored.get("machine_info") or {}).get("gpu")) or peak
            problem = speed_verdict.implausible(base, case, mode, stored_peak, stored.get("reference_kernel"))
            if problem:
                verdict.fail("baseline-impossible", f"{file}, entry {k!r}: {problem}. Not judged: re-record it "
                             f"(pytest --backend={backend.name} --check=speed --update-baselines) and commit it")
                continue
            measured[k] = _judge_stored(backend, case, device, mode, verdict, file, stored, base, timing)
        else:
            m = measured[k] = measure({"candidate": backend}, case, device, mode, verdict, **timing)["entries"]["candidate"]
            problem = speed_verdict.implausible(m, case, mode, peak, reference_name)
            if problem:
                verdict.fail("timing-impossible", f"{mode}: {problem}: the timing is wrong, nothing recorded")
    verdict.measurements.update(speed=measured, reference_kernel=reference_name, baseline_file=str(file),
                                speed_against=None if against is None else against.name)
    if update and verdict.passed:  # written once, at the end of the run, by whoever keeps the journal
        verdict.measurements["baseline_update"] = {
            "file": str(file), "arch": arch, "backend": backend.name, "cases": measured,
            "machine_info": baselines.machine_info(device), "reference_kernel": reference_name}
    return verdict


CHECK = Check(NAME, cases, run, needs=NEEDS, feature=CASE_FEATURE, measures=True, skip_reason=skip_reason)
