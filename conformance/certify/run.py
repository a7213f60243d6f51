"""`attn-conformance certify`: is this machine ready for the FlashAttention lab? The doctor, a quick
conformance run of every usable backend, a performance snapshot, the lab's tables, and a report.

Certified means: a CUDA GPU, no blocking setup problem, and the lab's backends (flash-attn when it is
installed, and SDPA's flash kernel) pass the core checks (forward, gradients, causal, sanity) of the
quick tier. Other backends' failures are reported, not blocking: they do not stop the lab.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from conformance import registry, results, threads
from conformance.certify import doctor, lab, report, snapshot
from conformance.checks import CORRECTNESS_CHECKS

LAB_BACKENDS = ("flash", "sdpa-flash")
CORE_CHECKS = ("forward", "gradients", "causal", "sanity")
SNAPSHOT = {"full": (512, 1024, 2048, 4096, 8192, 16384, 32768), "tiny": (64, 128, 256)}
SLOW_MS = 2000.0  # a curve stops after a call this slow (the plain-PyTorch tiled loop on long sequences)


def _conformance(usable: list[str], folder: Path) -> tuple[list[dict], dict]:
    """The quick tier of every usable backend, one pytest run each, side by side (correctness runs may
    share a GPU; nothing here is timed). Returns the records and, per backend, pytest's exit status
    and the end of its output (kept in conformance-NAME.log)."""
    runs = {}
    for name in usable:
        (folder / f"conformance-{name}.jsonl").unlink(missing_ok=True)  # never read an earlier run's results
        with open(folder / f"conformance-{name}.log", "w", encoding="utf-8") as log:
            runs[name] = subprocess.Popen([sys.executable, "-m", "pytest", "--pyargs", "conformance.suite", "-q",
                                           "-p", "no:cacheprovider", "--attn-tier=quick", "--attn-fuzz=off",
                                           f"--attn-check={','.join(CORRECTNESS_CHECKS)}", f"--attn-backend={name}",
                                           f"--attn-results-file={folder / f'conformance-{name}.jsonl'}"],
                                          stdout=log, stderr=subprocess.STDOUT)
    records, exits = [], {}
    for name, process in runs.items():
        exits[name] = (process.wait(), (folder / f"conformance-{name}.log").read_text(errors="replace")[-300:])
        journal = folder / f"conformance-{name}.jsonl"
        if journal.exists():
            contents = results.read(journal)
            if contents.complete:  # a run that did not finish proves nothing: its row says so
                records += contents.cases
    return records, exits


def _conformance_rows(records: list[dict], exits: dict) -> tuple[list[dict], dict]:
    """A row per backend; one whose run produced no record is a row too, never a silent pass."""
    rows, ratios = [], {}
    for name in dict.fromkeys([*exits, *(r["backend"] for r in records)]):
        mine = [r for r in records if r["backend"] == name]
        counts = Counter(r["outcome"] for r in mine)
        bad = [r for r in mine if r["outcome"] in ("failed", "crashed", "timed out")]
        lab_backend_failed = any(r["check"] in CORE_CHECKS for r in bad) or not counts["passed"]
        first = next((f"{r['check']} {r.get('case_id')}: {r['findings'][0]['message'][:160]}" for r in bad
                      if r.get("findings")), "")
        if not mine:
            status, tail = exits.get(name, (None, ""))
            first = (f"quick conformance did not run to its end (pytest exit status {status}): "
                     f"{' '.join(tail.split())[-200:]}")
        rows.append({"backend": name, "passed": counts["passed"], "failed": len(bad), "skipped": counts["skipped"],
                     "problems": ", ".join(f"{counts[k]} {k}" for k in ("crashed", "timed out", "oom") if counts[k]),
                     "blocking": name in LAB_BACKENDS and lab_backend_failed, "first_failure": first})
        comparisons = [c for r in mine for c in r.get("comparisons", []) if c.get("bound")]
        if comparisons:
            ratios[name] = max(c["error"] / c["bound"] for c in comparisons)
    return rows, ratios


def default_size() -> str:
    """The lab's sizes on a GPU; on a CPU the tiny ones (the full ones take many minutes and prove nothing
    about a GPU machine)."""
    return "full" if torch.cuda.is_available() else "tiny"


def certify(out: Path, size: str = "full", budget_gb: float = 16.0) -> int:
    from rich.console import Console
    from rich.progress import Progress

    console = Console()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype_name, dtype = ("bf16", torch.bfloat16) if device == "cuda" else ("fp32", torch.float32)
    profile = lab.PROFILES[size]
    out.mkdir(parents=True, exist_ok=True)
    data: dict = {"created": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "device": device, "size": size,
                  "load": {"cores": threads.cores_available(), "before": _load()}}
    with Progress(console=console) as progress:
        task = progress.add_task("environment doctor", total=5)

        def step(description: str) -> None:  # the bar, and a timed line that stays in a log
            progress.update(task, advance=1, description=description)
            progress.console.log(description)
        env, rows = doctor.environment(), doctor.backends()
        problems = doctor.problems(env, rows)
        usable = [r["name"] for r in rows if r["usable"] and device in r["devices"]]
        step(f"quick conformance of {len(usable)} backends")
        records, exits = _conformance(usable, out)
        conformance_rows, ratios = _conformance_rows(records, exits)
        problems += doctor.explain_findings(records)
        step("performance snapshot")
        backends = {name: registry.load(name) for name in usable}
        curves, kernels = {}, {}
        for name, backend in backends.items():
            progress.console.log(f"performance snapshot: {name}")
            curves[name] = snapshot.curve(backend, SNAPSHOT[size], device, dtype_name, slow_ms=SLOW_MS)
            kernels[name] = snapshot.kernels(backend, device, dtype_name, SNAPSHOT[size][1])
        step("the lab's tables")
        fast = next((backends[n] for n in ("flash", "sdpa-flash", "tiled") if n in backends), None)
        impls = ["eager", "sdpa"] + (["flash_attention_2"] if "flash" in backends else [])
        lab_data = {
            "forward_config": f"batch {profile['forward_batch']}, 16 heads, head dim 64, {dtype_name}, "
                              f"standard = naive, flash = {fast.name if fast else 'none'}",
            "forward": lab.forward_table(backends["naive"], fast, device, dtype_name, profile) if fast else [],
            "gpt2_model": lab.gpt2_label(profile["gpt2"]),
            "gpt2_config": f"{dtype_name}, AdamW, randomly initialised",
            "gpt2_batch": profile["gpt2_batch"], "gpt2_impls": impls,
            "gpt2": lab.gpt2_table(device, dtype, profile, impls),
            "long_config": f"{lab.model_label(profile['long_model'])}, batch 1, {dtype_name}, budget {budget_gb:g} GB",
            "long": lab.long_sequence_table({"naive": backends["naive"], **({fast.name: fast} if fast else {})},
                                            device, dtype, profile, budget_gb),
        }
        lab_data["long_verdict"] = _long_verdict(lab_data["long"], device)
        step("report")
        data["load"]["after"] = _load()
        blocking = [p for p in problems if p.level == "fail"] + [r for r in conformance_rows if r["blocking"]]
        missing = [n for n in LAB_BACKENDS if n not in usable and (n != "flash" or env.get("flash-attn"))]
        certified = device == "cuda" and not blocking and not missing
        if certified:
            summary = f"{env['gpus'][0]['name']} is ready: the lab's backends pass the quick conformance checks"
        elif device != "cuda":
            summary = "GPU certification needs a GPU: this machine has none (CPU backends checked only)"
        else:
            what = [p.topic for p in blocking if hasattr(p, "topic")] + [
                f"{r['backend']}: {r['first_failure'] or 'no case passed'}" for r in conformance_rows if r["blocking"]] + [
                f"{n} is not usable" for n in missing]
            summary = "; ".join(what)
        data.update(certified=certified, summary=summary,
                    doctor={"environment": env, "backends": rows, "problems": [p.as_dict() for p in problems]},
                    conformance={"backends": conformance_rows, "max_error_ratio": ratios},
                    snapshot=curves, snapshot_config=f"batch 1, 16 heads, head dim 64, {dtype_name}",
                    kernels=kernels, lab=lab_data)
        page = report.write(data, out)
        step("done")
    console.print(f"[{'green' if certified else 'red'}]{'CERTIFIED' if certified else 'NOT CERTIFIED'}[/]: {summary}")
    console.print(f"report: {page}")
    return 0 if certified else 1


def _load() -> float | None:
    """The machine's 1-minute load average (None where the system has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _long_verdict(rows: list[dict], device: str) -> str:
    if device != "cuda":
        return "Not checked: needs a GPU (this run exercised the code path at a tiny size)."
    naive = next((r for r in rows if r["backend"] == "naive"), {})
    linear = [r for r in rows if r["backend"] != "naive"]
    if linear and linear[0].get("within_budget") and (naive.get("oom") or not naive.get("within_budget")):
        return "Confirmed on this machine."
    return "Not confirmed on this machine: see the table."
