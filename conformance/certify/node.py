"""Certifying every GPU of a host: one `certify` process per GPU, each pinned to its GPU
(CUDA_VISIBLE_DEVICES), all at once, then a node report with a row per GPU and the node's verdict.

Each GPU's run measures only its own GPU, so running them side by side does not distort what is
measured on the GPUs (the host's CPU cores are shared; the timing leaves launch overhead out). A GPU
that fails, runs hot, has another job on it or dies is named in its own row, never averaged away:
the node is certified only when every GPU is.
"""

from __future__ import annotations

import html
import json
import os
import subprocess
import sys
from pathlib import Path


def _gpu_run(gpu: str, out: Path, size: str, budget_gb: float) -> subprocess.Popen:
    with open(out / "certify.log", "w", encoding="utf-8") as log:  # the child keeps its own descriptor
        return subprocess.Popen([sys.executable, "-m", "conformance", "certify", "--out", str(out), "--size", size,
                                 "--memory-budget", str(budget_gb)],
                                env={**os.environ, "CUDA_VISIBLE_DEVICES": gpu}, stdout=log, stderr=subprocess.STDOUT)


def row(gpu: str, folder: Path, returncode: int) -> dict:
    """One GPU's line of the node report, from its own report.json (or why there is none)."""
    file = folder / "report.json"
    if not file.exists():
        tail = (folder / "certify.log").read_text(errors="replace")[-400:] if (folder / "certify.log").exists() else ""
        return {"gpu": gpu, "certified": False, "summary": f"no report: certify exited with {returncode}. {tail}".strip(),
                "report": None}
    report = json.loads(file.read_text())
    env = report["doctor"]["environment"]
    device = (env.get("gpus") or [{}])[0]
    failing = [r["backend"] for r in report["conformance"]["backends"] if r["failed"]]
    return {"gpu": gpu, "certified": report["certified"], "summary": report["summary"], "name": device.get("name"),
            "uuid": device.get("uuid"), "temperature_c": device.get("temperature_c"),
            "other_processes": device.get("other_processes"), "driver": env.get("driver"),
            "failing_backends": failing, "report": str(file.parent.name) + "/index.html"}


def verdict(rows: list[dict]) -> tuple[bool, str]:
    bad = [r for r in rows if not r["certified"]]
    if not rows:
        return False, "no GPU to certify"
    if not bad:
        return True, f"all {len(rows)} GPUs certified"
    return False, "; ".join(f"GPU {r['gpu']}: {r['summary']}" for r in bad)


def write(rows: list[dict], out: Path) -> Path:
    certified, summary = verdict(rows)
    (out / "node.json").write_text(json.dumps({"certified": certified, "summary": summary, "gpus": rows}, indent=1) + "\n")
    def cells(r: dict) -> str:
        link = f'<a href="{html.escape(r["report"])}">report</a>' if r["report"] else "-"
        state = '"ok">certified' if r["certified"] else '"bad">NOT certified'
        return (f"<tr><td>{html.escape(r['gpu'])}</td><td>{html.escape(str(r.get('name')))}</td><td class={state}</td>"
                f"<td>{html.escape(r['summary'])}</td><td>{r.get('temperature_c')}</td><td>{r.get('other_processes')}</td>"
                f"<td>{html.escape(r.get('driver') or '')}</td><td>{link}</td></tr>")

    page = out / "index.html"
    page.write_text(f"""<!doctype html><html><head><meta charset="utf-8"><title>node certification</title><style>
body{{font-family:system-ui,sans-serif;max-width:1100px;margin:24px auto}}td,th{{border:1px solid #ccc;padding:4px 8px}}
table{{border-collapse:collapse}}.ok{{color:#2e7d32}}.bad{{color:#c62828;font-weight:600}}</style></head><body>
<h1>Node certification: {'CERTIFIED' if certified else 'NOT CERTIFIED'}</h1><p>{html.escape(summary)}</p>
<table><tr><th>GPU</th><th>model</th><th>verdict</th><th>why</th><th>temperature (°C)</th>
<th>other processes</th><th>driver</th><th>report</th></tr>{''.join(map(cells, rows))}</table></body></html>
""")
    return page


def certify_node(out: Path, gpus: list[str], size: str, budget_gb: float) -> int:
    out.mkdir(parents=True, exist_ok=True)
    folders = {gpu: out / f"gpu{gpu}" for gpu in gpus}
    for folder in folders.values():
        folder.mkdir(exist_ok=True)
    print(f"certifying {len(gpus)} GPUs side by side, one process each: " + ", ".join(gpus), flush=True)
    runs = {gpu: _gpu_run(gpu, folders[gpu], size, budget_gb) for gpu in gpus}
    rows = []
    for gpu, process in runs.items():
        rows.append(row(gpu, folders[gpu], process.wait()))
        print(f"GPU {gpu}: {'certified' if rows[-1]['certified'] else 'NOT certified'}: {rows[-1]['summary']}", flush=True)
    page = write(rows, out)
    certified, summary = verdict(rows)
    print(f"{'CERTIFIED' if certified else 'NOT CERTIFIED'} node: {summary}\nreport: {page}")
    return 0 if certified else 1
