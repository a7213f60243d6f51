"""What the speed gate is worth, measured on a GPU, in one process (no pytest start-up per run).

  record: python tools/speed_gate.py record --out DIR --quick flash,xformers,... --standard flash,sdpa-cudnn
      writes baselines with the speed check's own recording path (the same as --update-baselines).
  gate:   python tools/speed_gate.py gate --baselines DIR --backends flash,sdpa-cudnn --passes 5 --json FILE
      Each pass measures every speed case of the tier (both modes) for one backend, four versions timed
      interleaved as --speed-against does: A (unchanged), A2 (unchanged again), B10 and B25 (test-only
      wrappers adding known extra work, a GPU sleep of 10% and 25% of the stored median after the call).
      From each measurement: A/A (A2 against A), A/B (B10, B25 against A), and stored (each against the
      stored baseline). A case is failed only when the next pass of that backend (cyclically) flags it too:
      the gate's confirmation run, taken one pass later. A run (one backend, one pass, every case) has a
      false alarm when an unchanged version fails any case; the extra work is caught when any case fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import torch

from conformance import baselines, registry, speed_verdict
from conformance.options import RunOptions
from conformance.checks import execute
from conformance.checks import speed as speed_check
from conformance.verdict import Verdict

EXTRA = {"B10": 0.10, "B25": 0.25}


def sleep_cycles_per_ms() -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(10_000_000)
    start.record()
    torch.cuda._sleep(100_000_000)
    end.record()
    end.synchronize()
    return 100_000_000 / start.elapsed_time(end)


def slowed(backend, extra_ms: float, cycles_per_ms: float):
    """Test-only: the backend plus known extra work on the same stream."""
    cycles = int(extra_ms * cycles_per_ms)

    def fn(*args, **kwargs):
        out = backend.fn(*args, **kwargs)
        torch.cuda._sleep(cycles)
        return out

    return dataclasses.replace(backend, name=f"{backend.name}+{extra_ms:.3f}ms", fn=fn)


def record(args) -> None:
    plan = [(name, "quick") for name in args.quick.split(",") if name] + \
           [(name, "standard") for name in args.standard.split(",") if name]
    for name, tier in plan:
        backend = registry.load(name)
        t0, failed, skipped = time.time(), [], 0
        for case in speed_check.cases(tier):
            if backend.capabilities.not_supported_reasons(case, "cuda", speed_check.NEEDS):
                skipped += 1
                continue
            try:
                verdict = execute("speed", backend, case, "cuda",
                                  RunOptions(tier=tier, baselines_dir=args.out, update_baselines=True))
            except Exception as exc:  # noqa: BLE001 - Unsupported, out of memory: say so, go on
                print(f"  {name} {case.id}: {type(exc).__name__}: {exc}")
                continue
            if not verdict.passed:
                failed.append(verdict.message())
            else:
                baselines.apply([verdict.measurements["baseline_update"]])
        print(f"recorded {name} {tier}: {time.time() - t0:.0f} s, {len(failed)} refused, {skipped} unsupported",
              flush=True)
        for message in failed:
            print("  " + message.replace("\n", "\n  "))


def gate(args) -> None:
    cycles = sleep_cycles_per_ms()
    props = torch.cuda.get_device_properties(0)
    info = baselines.machine_info("cuda")
    print(f"{props.name}, driver {info.get('driver')}, unit {info.get('gpu_uuid')}; sleep {cycles / 1e6:.3f} Mcycles/ms",
          flush=True)
    arch = baselines.arch_key("cuda")
    rows = []  # one per backend, pass, case and mode
    for p in range(args.passes):
        for name in args.backends.split(","):
            backend = registry.load(name)
            stored = baselines.load(baselines.path(args.baselines, arch, name), arch)
            t0 = time.time()
            for case in speed_check.cases(args.tier):
                for mode in speed_check.modes(backend):
                    base = stored["cases"].get(speed_check.key(mode, case)) if stored else None
                    if base is None:
                        continue
                    versions = {"A": backend, "B10": slowed(backend, EXTRA["B10"] * base["median_ms"], cycles),
                                "A2": backend, "B25": slowed(backend, EXTRA["B25"] * base["median_ms"], cycles)}
                    verdict = Verdict("speed", name, case, "cuda")
                    timed = speed_check.measure(versions, case, "cuda", mode, verdict)
                    row = {"pass": p, "backend": name, "case": case.id, "mode": mode, "outputs_ok": verdict.passed,
                           "gpu": timed["gpu"], "medians": {v: e["median_ms"] for v, e in timed["entries"].items()},
                           "base_median": base["median_ms"]}
                    for v in ("A2", "B10", "B25"):
                        j = speed_verdict.judge_ab(timed["samples"][v], timed["rounds"][v], timed["samples"]["A"],
                                           timed["rounds"]["A"])
                        row[f"ab_{v}"] = {"change": j["change"], "threshold": j["threshold"], "se": j["se"],
                                          "flag": j["slower"]}
                    for v in versions:
                        j = speed_verdict.judge(timed["entries"][v], base)
                        row[f"stored_{v}"] = {"change": j["absolute_change"], "threshold": j["absolute_threshold"],
                                              "flag": j["absolute_slower"]}
                    rows.append(row)
            done = [r for r in rows if r["pass"] == p and r["backend"] == name]
            print(f"pass {p} {name}: {len(done)} case-modes in {time.time() - t0:.0f} s; first-measurement flags: "
                  + ", ".join(f"{g} {sum(r[g]['flag'] for r in done)}" for g in
                              ("ab_A2", "ab_B10", "ab_B25", "stored_A", "stored_A2", "stored_B10", "stored_B25"))
                  + f"; max A/A |change| {100 * max(abs(r['ab_A2']['change']) for r in done):.1f}%; stored A changes "
                  f"{100 * min(r['stored_A']['change'] for r in done):+.1f}% to {100 * max(r['stored_A']['change'] for r in done):+.1f}%",
                  flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"machine": info, "rows": rows}, f)
    summarize(rows)


def summarize(rows: list[dict], passes: int | None = None) -> None:
    """Confirmed verdicts (flagged in this pass and in the backend's next complete pass, cyclically) per
    run, then the table. ``passes`` is unused: each backend's complete passes are found in ``rows``."""
    by = {(r["backend"], r["pass"], r["case"], r["mode"]): r for r in rows}
    done: dict[str, list[int]] = {}
    for r in rows:
        done.setdefault(r["backend"], [])
        if r["pass"] not in done[r["backend"]]:
            done[r["backend"]].append(r["pass"])
    table = {}
    for gate_name in ("ab_A2", "stored_A", "stored_A2", "ab_B10", "ab_B25", "stored_B10", "stored_B25"):
        failed_runs, runs, case_hits, case_total = 0, 0, 0, 0
        for backend, ps in done.items():
            for i, p in enumerate(ps):
                hits = 0
                for (b, q, case, mode), r in by.items():
                    if (b, q) != (backend, p):
                        continue
                    again = by.get((b, ps[(i + 1) % len(ps)], case, mode))
                    hits += bool(r[gate_name]["flag"] and again is not None and again[gate_name]["flag"])
                    case_total += 1
                case_hits += hits
                failed_runs += hits > 0
                runs += 1
        table[gate_name] = (failed_runs, runs, case_hits, case_total)
    print("\n| gate | version | runs failed | cases failed |\n| --- | --- | --- | --- |")
    labels = {"ab_A2": ("A/A (same run)", "unchanged"), "stored_A": ("stored baseline", "unchanged"),
              "stored_A2": ("stored baseline", "unchanged (2nd copy)"), "ab_B10": ("A/B (same run)", "+10% work"),
              "ab_B25": ("A/B (same run)", "+25% work"), "stored_B10": ("stored baseline", "+10% work"),
              "stored_B25": ("stored baseline", "+25% work")}
    for g, (failed, n, hits, total) in table.items():
        print(f"| {labels[g][0]} | {labels[g][1]} | {failed}/{n} | {hits}/{total} |")
    bad_outputs = sum(not r["outputs_ok"] for r in rows)
    print(f"timed-output or input checks failed in {bad_outputs} of {len(rows)} measurements")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record")
    rec.add_argument("--out", required=True)
    rec.add_argument("--quick", default="")
    rec.add_argument("--standard", default="")
    g = sub.add_parser("gate")
    g.add_argument("--baselines", default="baselines")
    g.add_argument("--backends", default="flash,sdpa-cudnn")
    g.add_argument("--tier", default="standard")
    g.add_argument("--passes", type=int, default=5)
    g.add_argument("--json", default=None)
    g.add_argument("--summarize", default=None, help="only print the table of a --json file")
    args = parser.parse_args(argv)
    if args.command == "record":
        record(args)
    elif args.summarize:
        data = json.load(open(args.summarize))
        summarize(data["rows"])
    else:
        gate(args)


if __name__ == "__main__":
    sys.exit(main())
