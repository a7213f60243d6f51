""".ci/run: a failing Triton run or failing self-tests fail CI with pytest's exit status, the self-tests
run even when the Triton run failed, and the script ends with the README's test command."""

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$CALLS"
case "$*" in
  *"--pyargs conformance.suite"*) exit "$TRITON_RC" ;;
  "-m pytest tests") exit "$TESTS_RC" ;;
esac
exit 0
"""


@pytest.mark.parametrize(("triton_rc", "tests_rc", "expected"),
                         [(0, 0, 0), (1, 0, 1), (5, 0, 5), (4, 0, 4), (0, 1, 1), (1, 2, 2)])
def test_exit_status(tmp_path, triton_rc, tests_rc, expected):
    (tmp_path / ".ci").mkdir()
    shutil.copy(ROOT / ".ci" / "run", tmp_path / ".ci" / "run")
    fake = tmp_path / "bin" / "python3"
    fake.parent.mkdir()
    fake.write_text(FAKE_PYTHON)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    calls = tmp_path / "calls"
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}", "CALLS": str(calls),
           "TRITON_RC": str(triton_rc), "TESTS_RC": str(tests_rc)}
    done = subprocess.run(["bash", str(tmp_path / ".ci" / "run")], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == expected, done.stdout + done.stderr
    lines = calls.read_text().splitlines()
    assert sum("--backend=tests/triton_kernel.py:attention" in line for line in lines) == 2
    assert lines[-1] == "-m pytest tests"


def test_the_ci_page_workflow_is_valid_yaml_with_both_jobs_and_readable_case_ids():
    import re

    from conformance.case import Case

    yaml = pytest.importorskip("yaml")
    page = (ROOT / "docs" / "ci.md").read_text()
    workflow, *fragments = (yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", page, re.S))
    assert set(workflow["jobs"]) == {"cpu", "gpu"}
    assert "self-hosted" in workflow["jobs"]["gpu"]["runs-on"]
    assert all(isinstance(f, dict) for f in fragments)  # what the notes add to a job
    for case_id in re.findall(r"\bb\d+_q\d+_k\d+_\w+?_seed\d+", page):
        assert Case.from_id(case_id).id == case_id
