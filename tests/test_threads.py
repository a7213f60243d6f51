"""Torch's threads in the judge and the kernel's process: at most threads.MAX_THREADS by default (a busy
machine cannot stall every parallel region), the user's OMP_NUM_THREADS / MKL_NUM_THREADS wins."""

import pytest
import torch

from conformance import threads
from conformance.backend import KernelRaised
from conformance.kernel_client import KernelProcess

REPORTS = "import torch\ndef fn(q, k, v, **kw): raise RuntimeError(f'threads={torch.get_num_threads()}')\n"


def _worker_threads(tmp_path) -> str:
    (tmp_path / "reports.py").write_text(REPORTS)
    spec = f"{tmp_path}/reports.py:fn"
    kernel = KernelProcess(call_timeout=60)
    try:
        backend = kernel.backend(spec, kernel.describe([spec])[spec])
        q = torch.zeros(1, 2, 1, 8)
        with pytest.raises(KernelRaised) as raised:
            backend.fn(q, q, q)
        return str(raised.value)
    finally:
        kernel.close()


def test_the_kernel_process_limits_its_threads_unless_the_user_chose(tmp_path, monkeypatch):
    for name in threads.USER_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    assert f"threads={threads.default_threads()}" in _worker_threads(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", str(threads.MAX_THREADS + 1))
    assert f"threads={threads.MAX_THREADS + 1}" in _worker_threads(tmp_path)


def test_the_default_is_bounded_by_the_cores_this_process_may_use(monkeypatch):
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0})
    assert threads.default_threads() == 1
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(64)))
    assert threads.default_threads() == threads.MAX_THREADS
    assert threads.user_setting({"OMP_NUM_THREADS": "3"}) == "OMP_NUM_THREADS"
    assert threads.user_setting({"OMP_NUM_THREADS": " "}) is None


def test_the_judge_limits_its_threads_unless_the_user_chose(pytester, monkeypatch):
    pytester.makepyfile(test_judge="import torch\n"
                                   "def test_threads():\n"
                                   "    print('judge threads', torch.get_num_threads())\n")
    for name in threads.USER_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads.MAX_THREADS + 1)
        monkeypatch.setenv("OMP_NUM_THREADS", str(threads.MAX_THREADS + 1))
        chosen = pytester.runpytest("-s", "--backend=naive", "test_judge.py")
        monkeypatch.delenv("OMP_NUM_THREADS")
        default = pytester.runpytest("-s", "--backend=naive", "test_judge.py")
    finally:
        torch.set_num_threads(before)
    chosen.stdout.fnmatch_lines([f"*judge threads {threads.MAX_THREADS + 1}*"])
    default.stdout.fnmatch_lines([f"*judge threads {threads.default_threads()}*"])


def test_huge_pages_for_large_tensors_unless_the_user_chose():
    env = {}
    assert threads.huge_pages(env) and env == {threads.HUGE_PAGES: "1"}
    env = {threads.HUGE_PAGES: "0"}
    assert not threads.huge_pages(env) and env == {threads.HUGE_PAGES: "0"}


def test_pytest_xdist_workers_share_the_cores_among_their_compilers(monkeypatch):
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(16)))
    env = {}
    assert threads.compile_threads(1, env) is None and env == {}  # one worker: torch's default (a core each)
    assert threads.compile_threads(16, env) == 1 and env[threads.COMPILE_THREADS] == "1"
    assert threads.compile_threads(4, {}) == 4 and threads.compile_threads(32, {}) == 1
    assert threads.compile_threads(16, {threads.COMPILE_THREADS: "8"}) == 8  # the user's choice wins


def test_a_pytest_xdist_worker_sets_its_compilers_share_for_the_kernels_process(pytester, monkeypatch):
    seen = pytester.path / "seen.txt"
    pytester.makepyfile(test_judge="import os\n"
                                   "def test_compile_threads():\n"
                                   f"    value = os.environ.get('{threads.COMPILE_THREADS}', 'unset')\n"
                                   f"    open({str(seen)!r}, 'w').write(value)\n")
    monkeypatch.delenv(threads.COMPILE_THREADS, raising=False)
    pytester.runpytest_subprocess("-n", "2", "-p", "no:cacheprovider", "--backend=naive",
                                  "test_judge.py").assert_outcomes(passed=1)  # one worker: the unit test above
    assert seen.read_text() == str(max(1, threads.cores_available() // 2))
