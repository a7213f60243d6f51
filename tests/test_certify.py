"""`attn-conformance certify` at its tiny size on the CPU, once per session, and the node report built
from per-GPU reports; contents are checked, not only that files exist."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conformance.certify import node

CPU_BACKENDS = {"naive", "sdpa-math", "tiled"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("certification")
    size = ["--size", "tiny"] if torch.cuda.is_available() else []  # on a CPU tiny is the default
    done = subprocess.run([sys.executable, "-m", "conformance", "certify", *size, "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    return out, done


def test_cpu_machine_is_not_certified_and_says_why(tiny):
    out, done = tiny
    assert done.returncode == 1, done.stdout + done.stderr
    assert "NOT CERTIFIED" in done.stdout and "GPU certification needs a GPU" in done.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["certified"] is False and report["device"] == "cpu" and report["size"] == "tiny"
    assert report["doctor"]["environment"]["torch"] == torch.__version__
    assert "no GPU" in [p["topic"] for p in report["doctor"]["problems"] if p["level"] == "fail"]
    usable = {b["name"]: b for b in report["doctor"]["backends"]}
    assert CPU_BACKENDS <= {n for n, b in usable.items() if b["usable"]}
    assert not usable["flash"]["usable"] and usable["flash"]["reasons"]  # with its reason


def test_quick_conformance_of_the_cpu_backends_passes_within_tolerance(tiny):
    report = json.loads((tiny[0] / "report.json").read_text())
    rows = {r["backend"]: r for r in report["conformance"]["backends"]}
    assert set(rows) == CPU_BACKENDS
    assert all(r["passed"] > 20 and r["failed"] == 0 and not r["blocking"] for r in rows.values())
    assert all(0 < ratio <= 1 for ratio in report["conformance"]["max_error_ratio"].values())


def test_snapshot_shows_the_quadratic_and_the_linear_backend_and_their_kernels(tiny):
    report = json.loads((tiny[0] / "report.json").read_text())
    snap = report["snapshot"]
    for name in CPU_BACKENDS:
        points = snap[name]["points"]
        assert [p["seqlen"] for p in points] == [64, 128, 256]
        # times are only positive: a ratio of two timings is noise on a loaded machine (it failed CI once)
        assert all(p["fwd_ms"] > 0 and p["fwdbwd_ms"] > 0 and p["fwd_peak_bytes"] > 0 for p in points)
        shares = [k["share"] for k in report["kernels"][name]]
        assert shares and all(0 < s <= 1 for s in shares) and sum(shares) <= 1 + 1e-9

    def growth(name):  # peak forward memory from 64 to 256 tokens
        points = snap[name]["points"]
        return points[-1]["fwd_peak_bytes"] / points[0]["fwd_peak_bytes"]

    assert growth("naive") > 2 * growth("tiled")  # N^2 scores versus blocks


def test_the_lab_tables_are_filled_with_measurements_beside_the_notes(tiny):
    lab = json.loads((tiny[0] / "report.json").read_text())["lab"]
    assert [r["seqlen"] for r in lab["forward"]] and all(r["standard_ms"] > 0 and r["flash_ms"] > 0 for r in lab["forward"])
    assert lab["gpt2_impls"] == ["eager", "sdpa"]
    for r in lab["gpt2"]:
        assert all(r[impl]["step_ms"] > 0 and 5 < r[impl]["loss"] < 15 for impl in lab["gpt2_impls"])  # ~ln(vocab)
    assert {r["backend"] for r in lab["long"]} == {"naive", "tiled"} and all(r["step_ms"] > 0 for r in lab["long"])
    assert lab["long_verdict"].startswith("Not checked: needs a GPU")


def test_report_page_embeds_every_plot(tiny):
    out = tiny[0]
    plots = sorted(p.name for p in out.glob("*.png"))
    assert plots == ["errors.png", "latency.png", "memory.png", "tflops.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000 for p in out.glob("*.png"))
    page = (out / "index.html").read_text()
    assert page.count("data:image/png;base64,") == len(plots) and "NOT CERTIFIED" in page
    text = re.sub(r"<[^>]+>", " ", re.sub(r'<style>.*?</style>|src="data:[^"]*"', "", page, flags=re.S))
    assert not re.search(r"\b(None|True|False)\b|[{}]", text), "raw Python values on the page"
    assert "A GPT-2-style model of 2 layers, 4 heads, width 64" in text and "GPT-2 Medium training" not in text
    assert "Measured on a CPU" in text and "Load average (1 minute)" in text


def test_values_labels_and_caveats_read_as_words():
    from conformance.certify import lab, report

    assert [report.value(v) for v in (None, True, False, [], (2.1, 1.8), 0.123456, 1234.5)] == [
        report.NONE, "yes", "no", report.NONE, "2.1 / 1.8", "0.123", "1234"]
    assert report.value({"step_ms": 12.0, "loss": 10.8, "peak_gb": 2.25}) == "12 ms, peak 2.2 GB"
    assert report.value({"oom": True}) == "out of memory"
    env = {"torch": "2.13.0", "cuda_runtime": None, "triton": None, "flash-attn": "2.8.3", "xformers": None}
    assert report.versions(env) == ("torch 2.13.0 (a CPU build, no CUDA) \u00b7 triton not installed \u00b7 "
                                    "flash-attn 2.8.3 \u00b7 xformers not installed")
    assert lab.gpt2_label(lab.PROFILES["full"]["gpt2"]).startswith("GPT-2 Medium (24 layers")
    assert lab.gpt2_label(lab.PROFILES["tiny"]["gpt2"]).startswith("A GPT-2-style model of 2 layers")
    busy = report.caveats({"device": "cuda", "load": {"cores": 2, "before": 3.5, "after": 4.0}})
    assert len(busy) == 1 and "times are noisy" in busy[0]
    quiet = report.caveats({"device": "cuda", "load": {"cores": 16, "before": 0.2, "after": 1.0}})
    assert "noisy" not in quiet[0] and report.caveats({"device": "cpu"})[0].startswith("Measured on a CPU")


def test_node_report_names_each_bad_gpu(tiny, tmp_path):
    good, bad = tmp_path / "gpu0", tmp_path / "gpu1"
    shutil.copytree(tiny[0], good)
    shutil.copytree(tiny[0], bad)
    report = json.loads((good / "report.json").read_text())
    report.update(certified=True, summary="ready")
    (good / "report.json").write_text(json.dumps(report))
    dead = tmp_path / "gpu2"
    dead.mkdir()
    (dead / "certify.log").write_text("RuntimeError: CUDA error: an illegal memory access was encountered\n")
    rows = [node.row("0", good, 0), node.row("1", bad, 1), node.row("2", dead, 1)]
    certified, summary = node.verdict(rows)
    assert not certified and "GPU 0" not in summary
    assert "GPU 1: GPU certification needs a GPU" in summary and "GPU 2: no report" in summary
    assert "illegal memory access" in summary
    page = node.write(rows, tmp_path).read_text()
    assert page.count("<tr>") == 4 and 'href="gpu0/index.html"' in page and "NOT CERTIFIED" in page
    assert json.loads((tmp_path / "node.json").read_text())["gpus"][0]["certified"] is True
    assert node.verdict(rows[:1]) == (True, "all 1 GPUs certified")


def test_a_lab_backend_whose_conformance_did_not_run_blocks_certification():
    from conformance.certify.run import _conformance_rows

    def record(backend, check, outcome):
        findings = [{"property": "forward", "message": "max error 3e-1 > bound 2e-3"}] if outcome == "failed" else []
        return {"backend": backend, "check": check, "outcome": outcome, "case_id": "b2_q64", "findings": findings}

    records = [record("flash", "forward", "passed"), record("flash", "window", "failed"),
               record("naive", "forward", "failed"), record("sdpa-math", "forward", "passed")]
    exits = {"flash": (1, ""), "naive": (1, ""), "sdpa-math": (0, ""),
             "sdpa-flash": (4, "ERROR: usage: unrecognized arguments: --backend=sdpa-flash")}
    rows = {r["backend"]: r for r in _conformance_rows(records, exits)[0]}
    assert not rows["flash"]["blocking"]  # a failure outside the core checks is reported, not blocking
    assert not rows["naive"]["blocking"]  # not one of the lab's backends
    assert rows["sdpa-flash"]["blocking"] and rows["sdpa-flash"]["passed"] == 0
    assert "did not run to its end (pytest exit status 4)" in rows["sdpa-flash"]["first_failure"]
    assert "unrecognized arguments" in rows["sdpa-flash"]["first_failure"]
    records.append(record("flash", "gradients", "failed"))
    assert _conformance_rows(records, exits)[0][0]["blocking"]


def test_plots_ratios_on_a_linear_axis_and_out_of_memory_in_the_legend(tmp_path, monkeypatch):
    """The H100 example's data: two backends over the bound, two out of memory at the same length."""
    import matplotlib.figure

    from conformance.certify import report

    data = json.loads((Path(__file__).parents[1] / "docs/example-certification-h100/report.json").read_text())
    saved = {}

    def savefig(fig, path, *args, **kwargs):
        ax = fig.axes[0]
        saved[Path(path).stem] = (ax.get_yscale(), [t.get_text() for t in ax.texts],
                                  [t.get_text() for t in ax.get_legend().get_texts()], ax.get_ylim())

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    report._plots(data, tmp_path)
    scale, labels, _, (low, high) = saved["errors"]
    assert scale == "linear" and low == 0 and high < 4
    assert "0.50" in labels and any(label.endswith("(cut)") for label in labels)  # 224x over is cut, its value shown
    for name in ("latency", "memory", "tflops"):
        _, texts, legend, _ = saved[name]
        assert not any("OOM" in t for t in texts)  # no labels on the plot to collide
        assert sum("out of memory at 32768" in t for t in legend) == 4  # naive and sdpa-math, both modes
