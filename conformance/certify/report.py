"""The certification report: a folder with report.json, PNG plots (matplotlib) and one HTML page that
embeds them, readable at a glance: a verdict first, then what was measured beside what the notes promise."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

PLOTS = ("latency", "memory", "tflops", "errors")


def _plots(report: dict, folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    curves = report["snapshot"]
    for name, key, ylabel, log in (("latency", "ms", "time per call (ms)", True),
                                   ("memory", "peak_bytes", "peak extra memory (MiB)", True),
                                   ("tflops", "tflops", "throughput (TFLOP/s)", False)):
        fig, ax = plt.subplots(figsize=(8, 4.2), dpi=110)
        colors = plt.get_cmap("tab10" if len(curves) <= 10 else "tab20").colors
        for (backend, data), color in zip(curves.items(), colors):  # a color per backend, a line style per mode
            for mode, style in (("fwd", "-"), ("fwdbwd", "--")):
                pts = [p for p in data["points"] if f"{mode}_{key}" in p]
                if not pts:
                    continue
                ys = [p[f"{mode}_{key}"] / (2**20 if key == "peak_bytes" else 1) for p in pts]
                ax.plot([p["seqlen"] for p in pts], ys, style, marker="o", ms=3, color=color,
                        label=f"{backend} {'forward' if mode == 'fwd' else 'fwd+bwd'}")
                if data.get("oom_at"):
                    ax.plot([data["oom_at"]], [ys[-1]], "x", color=color, ms=10, mew=2)
                    ax.annotate("OOM", (data["oom_at"], ys[-1]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xscale("log", base=2)
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{ylabel.split(' (')[0]} vs sequence length ({report['snapshot_config']})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        fig.savefig(folder / f"{name}.png")
        plt.close(fig)
        made.append(name)
    errors = report["conformance"]["max_error_ratio"]
    if errors:
        fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
        names = list(errors)
        ax.bar(names, [errors[n] for n in names], color=["tab:red" if errors[n] > 1 else "tab:green" for n in names])
        ax.axhline(1.0, color="black", lw=1, ls="--", label="tolerance bound")
        ax.set_yscale("log")  # a failing backend can be 100x over while passing ones sit near 0.3
        ax.set_ylabel("largest error / bound (log)")
        ax.set_title("error vs the float64 reference (quick tier; above 1 fails)")
        ax.legend(fontsize=8)
        plt.setp(ax.get_xticklabels(), rotation=30, ha="right", fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / "errors.png")
        plt.close(fig)
        made.append("errors")
    return made


def _table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        if isinstance(v, list):
            return html.escape("; ".join(map(str, v)))
        if isinstance(v, dict):
            return html.escape(", ".join(f"{k} {fmt(x)}" for k, x in v.items()))
        return html.escape("" if v is None else str(v))

    head = "".join(f"<th>{html.escape(title)}</th>" for _, title in columns)
    body = "".join("<tr>" + "".join(f"<td>{fmt(r.get(key))}</td>" for key, _ in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write(report: dict, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    made = _plots(report, folder)
    (folder / "report.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    ok = report["certified"]
    images = "".join(f'<figure><img alt="{n}" src="data:image/png;base64,'
                     f'{base64.b64encode((folder / f"{n}.png").read_bytes()).decode()}"></figure>' for n in made)
    env = report["doctor"]["environment"]
    gpu = ", ".join(f"{g['name']} (sm{g['compute_capability'].replace('.', '')}, {g['memory_gb']} GB)"
                    for g in env["gpus"]) or "no GPU"
    problems = report["doctor"]["problems"]
    lab = report["lab"]
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>attention certification</title><style>
body{{font-family:system-ui,sans-serif;max-width:1100px;margin:24px auto;color:#222}}
.verdict{{padding:14px 18px;border-radius:8px;font-size:20px;font-weight:600;
background:{'#e3f6e8' if ok else '#fde8e8'};border:2px solid {'#2e9e4f' if ok else '#c62828'}}}
table{{border-collapse:collapse;margin:8px 0 18px;font-size:13px}}td,th{{border:1px solid #ccc;padding:3px 7px;text-align:left}}
th{{background:#f3f3f3}}figure{{display:inline-block;margin:6px}}img{{max-width:520px}}.fail{{color:#c62828}}.warn{{color:#b26a00}}
</style></head><body><h1>Attention setup certification</h1>
<div class="verdict">{'CERTIFIED' if ok else 'NOT CERTIFIED'}: {html.escape(report['summary'])}</div>
<p>{html.escape(gpu)} &middot; torch {env['torch']} (CUDA {env['cuda_runtime']}, cuDNN {env['cudnn']}) &middot; triton {env['triton']}
&middot; flash-attn {env['flash-attn']} &middot; xformers {env['xformers']} &middot; driver {env.get('driver')} &middot; {report['created']}</p>
<h2>Environment doctor</h2>{''.join(f'<p class="{p["level"]}"><b>{html.escape(p["topic"])}</b>: {html.escape(p["text"])}<br>Fix: {html.escape(p["fix"])}</p>' for p in problems) or '<p>No known setup problem found.</p>'}
{_table(report['doctor']['backends'], [('name', 'backend'), ('usable', 'usable'), ('reasons', 'why not')])}
<h2>Quick conformance</h2>{_table(report['conformance']['backends'], [('backend', 'backend'), ('passed', 'passed'), ('failed', 'failed'), ('skipped', 'skipped'), ('problems', 'crashed / timed out / oom'), ('blocking', 'blocks certification'), ('first_failure', 'first failure')])}
<h2>Performance snapshot</h2>{images}
<h3>Kernels that ran (share of device time, one forward+backward)</h3>
{_table([{'backend': b, 'kernels': '; '.join(f"{k['name']} {100 * k['share']:.0f}%" for k in ks)} for b, ks in report['kernels'].items()], [('backend', 'backend'), ('kernels', 'kernels')])}
<h2>The lab's tables, measured here</h2>
<h3>Standard attention vs FlashAttention, forward ({html.escape(lab['forward_config'])})</h3>
{_table(lab['forward'], [('seqlen', 'seqlen'), ('standard_ms', 'standard ms'), ('flash_ms', 'flash ms'), ('speedup', 'speedup'), ('notes_standard_ms', 'notes: standard ms'), ('notes_flash_ms', 'notes: flash ms'), ('notes_speedup', 'notes: speedup')])}
<h3>GPT-2 Medium training step, batch {lab['gpt2_batch']} ({html.escape(lab['gpt2_config'])})</h3>
{_table(lab['gpt2'], [('seqlen', 'seqlen')] + [(impl, impl) for impl in lab['gpt2_impls']] + [('speedup', 'speedup'), ('notes_speedup', 'notes: speedup'), ('notes_memory_gb', 'notes: memory GB (standard, flash)')])}
<h3>Long-sequence training with RoPE ({html.escape(lab['long_config'])})</h3>
{_table(lab['long'], [('backend', 'backend'), ('tokens', 'tokens'), ('step_ms', 'step ms'), ('peak_gb', 'peak GB'), ('oom', 'OOM'), ('within_budget', 'within budget'), ('error', 'error')])}
<p>Notes' claim: "train 8K+ token sequences in under 16 GB with FlashAttention; standard attention OOMs". {html.escape(lab['long_verdict'])}</p>
</body></html>"""
    (folder / "index.html").write_text(page, encoding="utf-8")
    return folder / "index.html"
