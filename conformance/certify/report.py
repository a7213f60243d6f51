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

    from matplotlib.ticker import FuncFormatter, NullFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")
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
                xs = [p["seqlen"] for p in pts]
                label = f"{backend} {'forward' if mode == 'fwd' else 'fwd+bwd'}"
                if data.get("oom_at"):  # in the legend, not a label on the plot: several can share a point
                    label += f" (out of memory at {data['oom_at']}: x)"
                    ax.plot([data["oom_at"]], [ys[-1]], "x", color=color, ms=9, mew=2)
                ax.plot(xs, ys, style, marker="o", ms=3, color=color, label=label)
                if key == "ms" and all(f"{mode}_q1_ms" in p for p in pts):  # the spread of the timed calls
                    ax.fill_between(xs, [p[f"{mode}_q1_ms"] for p in pts], [p[f"{mode}_q3_ms"] for p in pts],
                                    color=color, alpha=0.18, lw=0)
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(plain)  # 512, not 2^9
        if log:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(plain)  # 20, not 2x10^1
            ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{ylabel.split(' (')[0]} vs sequence length ({report['snapshot_config']})"
                     + ("\nshaded: middle half of the timed calls" if key == "ms" else ""), fontsize=10)
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
        top = max(1.25, min(3.0, 1.15 * max(errors.values())))  # linear: 0.5 looks like 0.5; far over 1 is cut
        bars = ax.bar(names, [min(errors[n], top) for n in names],
                      color=["tab:red" if errors[n] > 1 else "tab:green" for n in names])
        for bar, n in zip(bars, names):  # the value on each bar, also where the bar is cut
            ax.annotate(f"{errors[n]:.2f}" + (" (cut)" if errors[n] > top else ""),
                        (bar.get_x() + bar.get_width() / 2, bar.get_height()), textcoords="offset points",
                        xytext=(0, 2), ha="center", va="bottom", fontsize=8)
        ax.axhline(1.0, color="black", lw=1, ls="--", label="tolerance bound")
        ax.set_ylim(0, top * 1.08)
        ax.set_ylabel("largest error / bound")
        ax.set_title("error vs the float64 reference (quick tier; above 1 fails)")
        ax.legend(fontsize=8)
        plt.setp(ax.get_xticklabels(), rotation=30, ha="right", fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / "errors.png")
        plt.close(fig)
        made.append("errors")
    return made


NONE = "\u2013"  # an en dash: no value


def value(v) -> str:
    """A value as a person reads it (plain text): no None, True/False or Python dicts."""
    if v is None or v == "" or v == [] or v == {}:
        return NONE
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    if isinstance(v, (list, tuple)):
        return " / ".join(value(x) for x in v) if all(isinstance(x, (int, float, str)) for x in v) else \
            "; ".join(value(x) for x in v)
    if isinstance(v, dict):
        return step(v) if {"step_ms", "oom", "error"} & set(v) else ", ".join(f"{k} {value(x)}" for k, x in v.items())
    return str(v)


def step(result: dict) -> str:
    """One training-step measurement: its time and peak memory, out of memory, or its error."""
    if result.get("oom"):
        return "out of memory"
    if "error" in result:
        return f"error: {result['error']}"
    peak = f", peak {result['peak_gb']:.1f} GB" if result.get("peak_gb") is not None else ""
    return f"{value(result['step_ms'])} ms{peak}"


def _table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    head = "".join(f"<th>{html.escape(title)}</th>" for _, title in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(value(r.get(key)))}</td>" for key, _ in columns) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def versions(env: dict) -> str:
    """The software line: each package's version, or that it is not installed."""
    def package(name: str) -> str:
        return f"{name} {env[name]}" if env.get(name) else f"{name} not installed"

    cuda = (f"CUDA {env['cuda_runtime']}, cuDNN {value(env.get('cudnn'))}" if env.get("cuda_runtime")
            else "a CPU build, no CUDA")
    driver = [f"driver {env['driver']}"] if env.get("driver") else []
    return " \u00b7 ".join([f"torch {env.get('torch')} ({cuda})", package("triton"), package("flash-attn"),
                            package("xformers"), *driver])


def caveats(report: dict) -> list[str]:
    """What the numbers on this page cannot say: on a CPU, and on a machine other work kept busy."""
    notes = []
    if report.get("device") != "cuda":
        notes.append("Measured on a CPU, at a tiny size: these times compare plain-PyTorch CPU implementations "
                     "(the 'flash' column is the tiled loop, not FlashAttention), so the speedups and curves say "
                     "nothing about a GPU and nothing about the lab's numbers. They show that the code path runs.")
    load = report.get("load") or {}
    cores = load.get("cores") or 1
    if load.get("before") is not None:
        busy = load["before"] >= 0.5 * cores
        text = (f"Load average (1 minute) on {cores} cores: {load['before']:.2f} before the run, "
                f"{load['after']:.2f} at its end (this run's own processes included).")
        if busy:
            text += (" Other work was running before this run started: times are noisy (the shaded band of the "
                     "time plot is the middle half of the timed calls); rerun on an idle machine before reading "
                     "anything into a curve.")
        notes.append(text)
    return notes


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
<p>{html.escape(gpu)} &middot; {html.escape(versions(env))} &middot; {html.escape(report['created'])}</p>
{''.join(f'<p class="warn">{html.escape(note)}</p>' for note in caveats(report))}
<h2>Environment doctor</h2>{''.join(f'<p class="{p["level"]}"><b>{html.escape(p["topic"])}</b>: {html.escape(p["text"])}<br>Fix: {html.escape(p["fix"])}</p>' for p in problems) or '<p>No known setup problem found.</p>'}
{_table(report['doctor']['backends'], [('name', 'backend'), ('usable', 'usable'), ('reasons', 'why not')])}
<h2>Quick conformance</h2>{_table(report['conformance']['backends'], [('backend', 'backend'), ('passed', 'passed'), ('failed', 'failed'), ('skipped', 'skipped'), ('problems', 'crashed / timed out / out of memory'), ('blocking', 'blocks certification'), ('first_failure', 'first failure')])}
<h2>Performance snapshot</h2>{images}
<h3>Kernels that ran (share of device time, one forward+backward)</h3>
{_table([{'backend': b, 'kernels': '; '.join(f"{k['name']} {100 * k['share']:.0f}%" for k in ks)} for b, ks in report['kernels'].items()], [('backend', 'backend'), ('kernels', 'kernels')])}
<h2>The lab's tables, measured here</h2>
<h3>Standard attention vs FlashAttention, forward ({html.escape(lab['forward_config'])})</h3>
{_table(lab['forward'], [('seqlen', 'seqlen'), ('standard_ms', 'standard ms'), ('flash_ms', 'flash ms'), ('speedup', 'speedup'), ('notes_standard_ms', 'notes: standard ms'), ('notes_flash_ms', 'notes: flash ms'), ('notes_speedup', 'notes: speedup')])}
<h3>{html.escape(lab.get('gpt2_model', 'GPT-2'))} training step, batch {lab['gpt2_batch']} ({html.escape(lab['gpt2_config'])})</h3>
{_table(lab['gpt2'], [('seqlen', 'seqlen')] + [(impl, impl) for impl in lab['gpt2_impls']] + [('speedup', 'speedup'), ('notes_speedup', 'notes: speedup'), ('notes_memory_gb', 'notes: memory GB (standard, flash)')])}
<h3>Long-sequence training with RoPE ({html.escape(lab['long_config'])})</h3>
{_table(lab['long'], [('backend', 'backend'), ('tokens', 'tokens'), ('step_ms', 'step ms'), ('peak_gb', 'peak GB'), ('oom', 'out of memory'), ('within_budget', 'within budget'), ('error', 'error')])}
<p>Notes' claim: "train 8K+ token sequences in under 16 GB with FlashAttention; standard attention OOMs". {html.escape(lab['long_verdict'])}</p>
</body></html>"""
    (folder / "index.html").write_text(page, encoding="utf-8")
    return folder / "index.html"
