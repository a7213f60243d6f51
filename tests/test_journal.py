"""The results journal keeps reruns apart: a run narrowed by --case or --check is appended after the
runs in the file, under its own run id; readers take the last run, or the one named."""

import json

from conformance import cli, results

CASE = "b1_q17_k17_h4_d32_fp32_seed1"


def _run(path, cases, append, exitstatus=0):
    recorder = results.Recorder(str(path), {"device": "cpu", "tier": "quick"}, append=append)
    for case_id, outcome in cases:
        recorder.add({"record": "case", "backend": "mine", "check": "forward", "outcome": outcome, "case_id": case_id})
    if exitstatus is not None:
        recorder.finish(exitstatus)
    recorder.close()
    return recorder._journal.run_id


def test_a_rerun_is_appended_and_a_full_run_replaces(tmp_path):
    path = tmp_path / "conformance-results.jsonl"
    full = _run(path, [("a", "failed"), ("b", "passed")], append=False, exitstatus=1)
    rerun = _run(path, [("a", "passed")], append=True)
    runs = results.read_runs(path)
    assert [r.header["run_id"] for r in runs] == [full, rerun]
    assert [len(r.cases) for r in runs] == [2, 1] and all(r.complete for r in runs)
    last = results.read(path)
    assert last.header["run_id"] == rerun and [h["run_id"] for h in last.others] == [full]
    assert results.read(path, full[:6]).cases[0]["outcome"] == "failed"
    again = _run(path, [("c", "passed")], append=False)
    assert [r.header["run_id"] for r in results.read_runs(path)] == [again]


def test_a_rerun_after_a_killed_run_keeps_both_readable(tmp_path):
    path = tmp_path / "conformance-results.jsonl"
    killed = _run(path, [("a", "passed")], append=False, exitstatus=None)
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"record": "case", "backend": "mi')  # killed while writing this line
    rerun = _run(path, [("b", "passed")], append=True)
    first, second = results.read_runs(path)
    assert first.header["run_id"] == killed and not first.complete and len(first.cases) == 1
    assert second.header["run_id"] == rerun and second.complete and results.read(path).header["run_id"] == rerun


def test_attn_conformance_summary_names_the_other_runs_and_shows_the_one_asked(tmp_path, capsys):
    path = tmp_path / "j.jsonl"
    full = _run(path, [("a", "failed")], append=False, exitstatus=1)
    _run(path, [("a", "passed")], append=True)
    assert cli.main(["summary", str(path)]) == 0
    out = capsys.readouterr().out
    assert "holds 2 runs" in out and f"run {full} started" in out
    assert cli.main(["summary", str(path), "--run", full[:5]]) == 1
    assert cli.main(["summary", str(path), "--run", "zzz"]) == 2


def test_a_case_rerun_by_pytest_keeps_the_run_before_it(pytester):
    args = ("--pyargs", "conformance.suite", "-p", "no:cacheprovider", "--backend=naive", "--check=forward")
    pytester.runpytest(*args, f"--case={CASE}")
    pytester.runpytest(*args, f"--case={CASE}")
    lines = (pytester.path / "conformance-results.jsonl").read_text().splitlines()
    headers = [json.loads(line) for line in lines if json.loads(line)["record"] == "run"]
    assert len(headers) == 2 and headers[0]["run_id"] != headers[1]["run_id"]
    assert [len(r.cases) for r in results.read_runs(pytester.path / "conformance-results.jsonl")] == [1, 1]


def test_a_long_finding_is_cut_on_the_terminal_and_whole_in_the_journal():
    """A compiler's error (flex's InductorError prints its whole lowering) would fill a screen per case."""
    from conformance.case import Case
    from conformance.verdict import MESSAGE_LINES, Verdict

    verdict = Verdict("forward", "mine", Case(), "cpu")
    long = "\n".join(f"line {i}" for i in range(MESSAGE_LINES + 30))
    verdict.fail("raised", long)
    verdict.fail("forward", "short")
    shown = verdict.message()
    assert f"line {MESSAGE_LINES - 1}" in shown and f"line {MESSAGE_LINES}\n" not in shown
    assert "30 more lines in the results journal" in shown and shown.endswith("[forward] short")
    assert verdict.as_dict()["findings"][0]["message"] == long
