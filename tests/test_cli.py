"""The command line: --version, help per command, `run` handing its arguments to pytest cleanly,
certify naming its extra, `compare` of journals and baseline folders, the benchmark export."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conformance import __version__, baselines, cli
from conformance.results import Journal

ROOT = Path(__file__).resolve().parent.parent


def _run(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "conformance", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)


def test_version_and_help_per_command(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"attn-conformance {__version__}"
    for command in ("summary", "compare", "export-benchmark", "certify", "list-backends", "update-baselines"):
        with pytest.raises(SystemExit) as done:
            cli.main([command, "--help"])
        out = capsys.readouterr().out
        assert done.value.code == 0 and out.startswith(f"usage: attn-conformance {command}"), out
    with pytest.raises(SystemExit) as done:
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and all(c in out for c in ("run", "summary", "compare", "export-benchmark", "certify"))
    with pytest.raises(SystemExit) as done:
        cli.main([])
    assert done.value.code == 2


def test_run_passes_its_arguments_to_pytest_without_warnings(tmp_path):
    journal = tmp_path / "j.jsonl"
    done = _run("run", "-q", "-p", "no:cacheprovider", "-W", "error::pytest.PytestAssertRewriteWarning",
                "--backend=naive", "--device=cpu", "--check=forward", "--tier=quick", "--fuzz=off",
                "--case=b1_q1_k1_h1_d8_fp32_seed0", f"--results-file={journal}", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout and "Warning" not in done.stdout + done.stderr
    assert json.loads(journal.read_text().splitlines()[1])["outcome"] == "passed"


def test_certify_names_its_extra_when_it_is_missing(monkeypatch, capsys):
    real = cli.importlib.util.find_spec
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name: None if name == "rich" else real(name))
    assert cli.main(["certify", "--size", "tiny"]) == 2
    assert "pip install 'attention-conformance[certify]'" in capsys.readouterr().err


def _journal(path, records, speed=None, end=0):
    j = Journal(path, {"device": "cpu", "tier": "quick"})
    for backend, check, case, outcome, ratio in records:
        record = {"record": "case", "backend": backend, "check": check, "case_id": case, "outcome": outcome,
                  "tier": "quick", "device": "cuda", "comparisons": [{"name": "out", "error": ratio, "bound": 1.0}], "findings": [],
                  "measurements": {}}
        if outcome == "failed":
            record["findings"] = [{"property": "forward", "message": "out: max abs error 3 EXCEEDS bound 1"}]
        if speed and (backend, case) in speed:
            record["measurements"] = {"speed": {f"fwd:{case}": {"median_ms": speed[backend, case], "iqr_ms": 0.01,
                                                                "tflops": 100.0, "rounds": 12}}}
        j.write(record)
    if end is not None:
        j.write({"record": "end", "exitstatus": end})
    j.close()
    return path


def test_compare_journals_names_new_failures_fixes_ratios_and_slowdowns(tmp_path, capsys):
    a = _journal(tmp_path / "a.jsonl", [("k", "forward", "c1", "passed", 0.1), ("k", "forward", "c2", "failed", 3.0),
                                        ("k", "causal", "c3", "passed", 0.1), ("k", "speed", "c4", "passed", 0.1)],
                 speed={("k", "c4"): 1.0})
    b = _journal(tmp_path / "b.jsonl", [("k", "forward", "c1", "failed", 2.0), ("k", "forward", "c2", "passed", 0.5),
                                        ("k", "causal", "c3", "passed", 0.5), ("k", "speed", "c4", "passed", 0.1)],
                 speed={("k", "c4"): 1.25}, end=1)
    assert cli.main(["compare", str(a), str(b)]) == 1
    out = capsys.readouterr().out
    assert "new failures (1):\n  k/forward/c1: passed -> failed [forward] out: max abs error 3 EXCEEDS bound 1" in out
    assert "fixed (1):\n  k/forward/c2: failed -> passed" in out
    assert "k/causal/c3: error/bound 0.1 -> 0.5 (x5.00)" in out
    assert "SLOWER k/fwd:c4: 1.0000 -> 1.2500 ms (+25.0%)" in out
    assert "REGRESSION: 1 new failure(s), 1 slowdown(s) over 4 cases compared" in out
    assert cli.main(["compare", str(a), str(a)]) == 0
    assert "no regression over 4 cases compared" in capsys.readouterr().out
    assert cli.main(["compare", str(b), str(a), "--slowdown", "30"]) == 1  # c2 fails again; -20% is no slowdown
    assert "SLOWER" not in capsys.readouterr().out


def test_compare_baseline_folders_gives_the_median_change_per_entry(tmp_path, capsys):
    for name, scale in (("a", 1.0), ("b", 1.2)):
        data = {"schema": baselines.SCHEMA, "arch": "sm90-x", "cases": {
            "fwd:c1": {"median_ms": 1.0 * scale, "iqr_ms": 0.01}, "fwdbwd:c1": {"median_ms": 2.0, "iqr_ms": 0.01}}}
        baselines.save(baselines.path(tmp_path / name, "sm90-x", "flash"), data)
    assert cli.main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 1
    out = capsys.readouterr().out
    assert "SLOWER sm90-x/flash/fwd:c1: 1.0000 -> 1.2000 ms (+20.0%)" in out
    assert "  sm90-x/flash/fwdbwd:c1: 2.0000 -> 2.0000 ms (+0.0%)" in out
    assert "REGRESSION: 0 new failure(s), 1 slowdown(s) over 2 entries compared" in out
    assert cli.main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--slowdown", "25"]) == 0
    capsys.readouterr()
    # the shipped H100 baselines against themselves
    assert cli.main(["compare", str(baselines.PACKAGED_DIR), str(ROOT / "baselines")]) == 0
    assert cli.main(["compare", str(tmp_path / "a"), str(_journal(tmp_path / "j.jsonl", []))]) == 2
    assert "not one of each" in capsys.readouterr().err


def test_export_benchmark_writes_github_action_benchmark_json(tmp_path):
    j = _journal(tmp_path / "j.jsonl", [("k", "speed", "c4", "passed", 0.1), ("k", "forward", "c1", "passed", 0.1)],
                 speed={("k", "c4"): 1.5})
    assert cli.main(["export-benchmark", str(j), "-o", str(tmp_path / "bench.json")]) == 0
    entries = json.loads((tmp_path / "bench.json").read_text())
    assert entries == [{"name": "k fwd:c4", "unit": "ms", "value": 1.5, "range": "IQR 0.0100",
                        "extra": "tier quick; device cuda; outcome passed; 100.0 TFLOP/s; 12 rounds"}]
    assert all(isinstance(e["name"], str) and isinstance(e["value"], float) for e in entries)


def test_update_baselines_writes_what_a_cut_runs_journal_holds(tmp_path, capsys):
    """--update-baselines writes the files at the run's end; a run cut before it (a GPU lease's time limit)
    wrote none, but its journal keeps each finished case's measurements."""
    arch, entry = "sm90-x", {"median_ms": 1.0, "iqr_ms": 0.01, "rounds": 100}
    j = Journal(tmp_path / "cut.jsonl", {"device": "cuda", "tier": "standard"})
    for case in ("c1", "c2"):
        update = {"file": "elsewhere/flash.json", "arch": arch, "backend": "flash", "cases": {f"fwd:{case}": entry},
                  "machine_info": {"arch": arch}, "reference_kernel": "torch.bfloat16 matmul 4096^3"}
        j.write({"record": "case", "backend": "flash", "check": "speed", "case_id": case, "outcome": "passed",
                 "tier": "standard", "device": "cuda", "findings": [],
                 "measurements": {"speed": {f"fwd:{case}": entry}, "baseline_update": update}})
    j.write({"record": "case", "backend": "flash", "check": "speed", "case_id": "c3", "outcome": "failed",
             "tier": "standard", "device": "cuda", "findings": [], "measurements": {"speed": {"fwd:c3": entry}}})
    j.close()  # no end record: the run was cut
    assert cli.main(["update-baselines", str(tmp_path / "cut.jsonl"), "--baselines-dir", str(tmp_path / "b")]) == 0
    file = baselines.path(tmp_path / "b", arch, "flash")
    assert capsys.readouterr().out == f"{file}: 2 entries written\n"
    stored = baselines.load(file, arch)
    assert set(stored["cases"]) == {"fwd:c1", "fwd:c2"} and stored["backend"] == "flash"
    assert cli.main(["update-baselines", str(_journal(tmp_path / "none.jsonl", [("k", "speed", "c4", "passed", 0.1)]))]) == 1
    assert "holds no baseline update" in capsys.readouterr().err
