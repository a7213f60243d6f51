"""Crashing, hanging and out-of-memory backends never end or corrupt a run; a killed run keeps its journal."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from conformance import results
from conformance.case import Case

CRASHERS = (Path(__file__).parent / "crashers.py").read_text()
# One case of each kind the crashers react to, plus plain ones.
CASES = ",".join([
    "b2_q17_k17_h4_d40_fp32_seed1",          # seqlen 17: segfault
    "b2_q65_k65_h4_d59_fp32_seed2",          # head dim 59: abort
    "b2_q65_k65_h8_kv2_d64_fp32_seed3",      # GQA: hang
    "b2_q65_k65_h4_d64_fp32_packed_seed4",   # non-contiguous: CUDA-like error
    "b1_q33_k33_h4_d64_fp32_seed5",          # batch 1: out of memory
    "b2_q33_k65_h4_d64_fp32_seed6",          # plain
])


def run_crashers(pytester, *backends, extra=("--case-timeout=4",)):
    pytester.makepyfile(crashers=CRASHERS)
    specs = ",".join(f"crashers.py:{b}" if b != "naive" else b for b in backends)
    result = pytester.runpytest("--pyargs", "conformance.suite", "-p", "no:cacheprovider", f"--backend={specs}",
                                "--check=forward", f"--case={CASES}", *extra)
    return result, results.read(pytester.path / "conformance-results.jsonl").cases


def outcomes(records, backend):
    return {r["case_id"]: (r["outcome"], " ".join(f["message"] for f in r.get("findings", [])) + " ".join(r.get("reasons", [])))
            for r in records if r["backend"] == backend}


def test_crashes_hangs_and_oom_are_results_and_the_run_goes_on(pytester):
    result, records = run_crashers(pytester, "segfaults_at_17", "aborts_at_d59", "hangs_on_gqa",
                                   "cuda_error_on_packed", "oom_on_batch1", "naive")
    seg = outcomes(records, "crashers.py:segfaults_at_17")
    assert seg["b2_q17_k17_h4_d40_fp32_seed1"][0] == "crashed" and "SIGSEGV" in seg["b2_q17_k17_h4_d40_fp32_seed1"][1]
    assert "Segmentation fault" in seg["b2_q17_k17_h4_d40_fp32_seed1"][1]  # faulthandler's report, from the log
    abort = outcomes(records, "crashers.py:aborts_at_d59")["b2_q65_k65_h4_d59_fp32_seed2"]
    assert abort[0] == "crashed" and "SIGABRT" in abort[1]
    hang = outcomes(records, "crashers.py:hangs_on_gqa")["b2_q65_k65_h8_kv2_d64_fp32_seed3"]
    assert hang[0] == "timed out" and "did not return within 4 s" in hang[1]
    cuda = outcomes(records, "crashers.py:cuda_error_on_packed")["b2_q65_k65_h4_d64_fp32_packed_seed4"]
    assert cuda[0] == "crashed" and "illegal memory access" in cuda[1]
    oom = outcomes(records, "crashers.py:oom_on_batch1")["b1_q33_k33_h4_d64_fp32_seed5"]
    assert oom[0] == "oom" and "Tried to allocate 20.00 GiB" in oom[1]
    # every other case of every crasher, run in a fresh worker after the crash, passed; so did naive
    assert sum(r["outcome"] == "passed" for r in records) == 6 * 6 - 5
    assert set(o for o, _ in outcomes(records, "naive").values()) == {"passed"}
    result.stdout.fnmatch_lines(["*crashers.py:segfaults_at_17*FAIL*1 crashed*", "*crashers.py:hangs_on_gqa*1 timed out*",
                                 "*crashers.py:oom_on_batch1*pass*1 oom*", "naive *pass*"])
    assert result.ret == pytest.ExitCode.TESTS_FAILED


def test_a_backend_that_keeps_crashing_is_given_up_on(pytester):
    result, records = run_crashers(pytester, "always_segfaults", "naive", extra=("--case-timeout=4", "--crash-limit=2"))
    seg = [o for o, _ in outcomes(records, "crashers.py:always_segfaults").values()]
    assert seg == ["crashed", "crashed", "not run", "not run", "not run", "not run"]
    assert set(o for o, _ in outcomes(records, "naive").values()) == {"passed"}
    result.stdout.fnmatch_lines(["*   4  not run: crashers.py:always_segfaults crashed or timed out on 2 cases in a row*"])


def test_device_assert_poisons_the_worker_which_is_replaced(pytester):
    pytester.makepyfile(crashers=CRASHERS)
    result = pytester.runpytest("--pyargs", "conformance.suite", "-p", "no:cacheprovider", "--tier=quick",
                                "--backend=crashers.py:device_assert_on_causal", "--check=causal,sanity", "--crash-limit=50")
    records = results.read(pytester.path / "conformance-results.jsonl").cases
    crashed = [r for r in records if r["outcome"] == "crashed"]
    assert crashed and all("device-side assert" in r["findings"][0]["message"] for r in crashed)
    assert any(r["outcome"] == "passed" for r in records)  # the non-causal sanity cases, after the crashes


def test_in_process_mode_still_reports_oom(pytester):
    result, records = run_crashers(pytester, "oom_on_batch1", extra=("--isolation=none",))
    assert outcomes(records, "crashers.py:oom_on_batch1")["b1_q33_k33_h4_d64_fp32_seed5"][0] == "oom"


def test_killed_run_keeps_finished_cases_and_the_summary_rebuilds(pytester):
    pytester.makepyfile(crashers=CRASHERS)
    journal = pytester.path / "conformance-results.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "--pyargs", "conformance.suite", "-p", "no:cacheprovider",
                             "--tier=quick", "--check=forward", "--backend=crashers.py:sleeps_then_works"],
                            cwd=pytester.path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:  # the third forward case (seqlen 65) sleeps: kill the run inside it
        if journal.exists() and len(journal.read_text().splitlines()) >= 4:
            break
        time.sleep(0.2)
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    lines = journal.read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(line) for line in lines)
    rebuilt = subprocess.run([sys.executable, "-m", "conformance", "summary", str(journal)], capture_output=True,
                             text=True)
    assert "3 cases recorded" in rebuilt.stdout and "crashers.py:sleeps_then_works  3/0/0" in rebuilt.stdout
    assert rebuilt.returncode == 1 and "INCOMPLETE: the run did not finish" in rebuilt.stderr  # never a pass


BOILERPLATE = ("\nSearch for `cudaErrorMemoryAllocation' in https://docs.nvidia.com/cuda/cuda-runtime-api/group__CUDART__TYPES"
               ".html for more information.\nCUDA kernel errors might be asynchronously reported at some other API call, "
               "so the stacktrace below might be incorrect.\nFor debugging consider passing CUDA_LAUNCH_BLOCKING=1\n"
               "Compile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.\n")


@pytest.mark.parametrize("text, kind", [
    # what torch, inductor's Triton launcher and cuBLAS raised on an H100 that 32 processes shared
    ("BackendCompilerFailed: backend='inductor' raised:\nAcceleratorError: CUDA error: out of memory" + BOILERPLATE,
     "OutOfMemory"),
    ("CUDA driver error: out of memory", "OutOfMemory"),
    ("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`", "OutOfMemory"),
    ("CUDA error: an illegal memory access was encountered" + BOILERPLATE, "DeviceFault"),
    ("CUDA error: device-side assert triggered" + BOILERPLATE, "DeviceFault"),
    ("CUDA error: the launch timed out and was terminated" + BOILERPLATE, "DeviceFault"),
    ("Triton Error [CUDA]: out of memory", "OutOfMemory"),
    ("CUDA error: invalid argument" + BOILERPLATE, None),  # torch's advice on device asserts is no assert
    ("the kernel ran out of memory in its own words", None),
])
def test_device_errors_are_sorted_by_their_own_text_not_by_the_advice_torch_appends(text, kind):
    from conformance.backend import classify

    found = classify(RuntimeError(text))
    assert (found.__name__ if found else None) == kind


def test_the_allocators_error_wrapped_by_torch_compile_is_out_of_memory():
    import torch
    from torch._dynamo.exc import BackendCompilerFailed

    from conformance.backend import OutOfMemory, classify

    wrapped = BackendCompilerFailed(lambda: None, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"), None)
    assert classify(wrapped) is OutOfMemory and classify(BackendCompilerFailed(lambda: None, KeyError(), None)) is None


def test_crashes_in_a_row_of_one_family_give_up_on_that_family_and_of_two_on_the_backend():
    """Under pytest-xdist a worker runs a family's cases in a row (scheduling.py)."""
    from conformance.isolation import CaseResult
    from conformance.outcomes import Outcome
    from conformance.session import ConformanceSession

    session = ConformanceSession.__new__(ConformanceSession)
    outcomes = {}
    session.runner = SimpleNamespace(run=lambda check, backend, case, *rest: CaseResult(outcomes[case.id]))
    session.selection, session.options, session.crash_limit = SimpleNamespace(device="cpu"), None, 2
    session.crash_streak, session.families_given_up = {}, {}
    backend, fp32 = SimpleNamespace(name="k"), Case(head_dim=64, seed=1)
    same, fp16, other_fp16 = fp32.replace(seqlen_q=65, seed=2), fp32.replace(dtype="fp16"), fp32.replace(dtype="fp16", seed=3)
    outcomes.update({fp32.id: Outcome.CRASHED, same.id: Outcome.CRASHED, fp16.id: Outcome.PASSED,
                     other_fp16.id: Outcome.TIMED_OUT})
    session.run("forward", backend, fp32)
    assert session.given_up_on(backend, same) is None
    session.run("forward", backend, same)
    assert "cases of this family in a row (fp32-d64" in session.given_up_on(backend, fp32.replace(seed=9))
    assert session.given_up_on(backend, fp16) is None and session.given_up_on(backend) is None
    session.run("forward", backend, fp16)  # a pass ends the streak, not the family's giving up
    assert "of this family" in session.given_up_on(backend, fp32) and session.given_up_on(backend, fp16) is None
    session.run("forward", backend, other_fp16)
    session.run("forward", backend, fp32)  # two families in a row: the backend
    assert "on 2 cases in a row (--crash-limit)" in session.given_up_on(backend, fp16.replace(seed=7))
    assert session.given_up_on(backend) == session.given_up_on(backend, fp16)


def test_workers_sharing_a_gpu_return_cached_device_memory_after_each_case(monkeypatch):
    """Each judge and kernel process keeping its largest case's peak ran a shared H100 out of memory."""
    from conformance import isolation, kernel_worker
    from conformance.options import RunOptions

    released, forgot = [], []
    monkeypatch.setattr(isolation, "_release_device_memory", lambda: released.append(1))
    monkeypatch.setattr(isolation, "execute", lambda *args: (_ for _ in ()).throw(isolation.OutOfMemory("x")))
    runner = isolation.Isolated.__new__(isolation.Isolated)
    runner.kernel = type("Kernel", (), {"forget": lambda self, release=False: forgot.append(release)})()
    for shared_by in (1, 3):
        runner.run("forward", None, None, "cuda", RunOptions(gpu_shared_by=shared_by))
    assert forgot == [False, True] and released == [1]  # after the case, even one that ended in an error

    monkeypatch.setattr(kernel_worker, "_release_memory", lambda: released.append(2))
    worker = kernel_worker._Worker()
    assert worker.handle("forget", False) == ("ok", None) and released == [1]
    assert worker.handle("forget", True) == ("ok", None) and released == [1, 2]


def test_an_out_of_memory_is_replied_as_one_even_when_releasing_memory_after_it_fails(monkeypatch):
    """The kernel's process frees cached device memory after an oom; where that raises too (a device the
    kernel left broken), the reply is still the oom, not a crash of the process's request loop."""
    from conformance import kernel_worker
    from conformance.backend import OutOfMemory

    def release():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(kernel_worker, "_release_memory", release)
    worker = kernel_worker._Worker()
    monkeypatch.setattr(worker, "call", lambda *args: (_ for _ in ()).throw(OutOfMemory("CUDA out of memory")))
    status, message = worker.handle("call", ())
    assert status == "oom" and message.startswith("CUDA out of memory (releasing memory after it then raised "
                                                  "RuntimeError: CUDA error: an illegal memory access")


def test_an_out_of_memory_in_the_judges_own_computation_says_so(monkeypatch):
    """On a GPU that workers share, the judge's float64 reference can run out too: an oom, said to be the judge's."""
    import torch

    from conformance import checks, expected
    from conformance.backend import OutOfMemory
    from conformance.backends import naive

    namespace = {"torch": torch}  # raised from torch's own code, as the allocator raises it
    exec(compile("def alloc(*args, **kwargs):\n    raise torch.OutOfMemoryError('CUDA out of memory.')\n",
                 torch.__file__, "exec"), namespace)
    monkeypatch.setattr(expected, "make_inputs", namespace["alloc"])
    with pytest.raises(OutOfMemory, match="^in the judge's own computation, OutOfMemoryError: CUDA out of memory"):
        checks.execute("forward", naive.BACKEND, Case(seqlen_q=9, seqlen_k=9, seed=861204), "cpu")


def test_a_fault_the_device_reports_only_at_the_next_synchronisation_is_the_calls_fault(monkeypatch):
    """cuDNN's misaligned address surfaced only after the call had returned; its output, shared over CUDA
    IPC unfinished, then hung the judge. The kernel's process now waits for the device before any reply
    (kernel_worker._settled): the fault is this request's, whatever its status, and no tensor is sent."""
    import torch

    from conformance import kernel_worker
    from conformance.inputs import make_inputs

    inputs = make_inputs(Case(seed=1), "cpu")
    call = ("naive", "fn", (inputs.q, inputs.k, inputs.v), {}, (True, True, True))
    worker = kernel_worker._Worker()
    reply = lambda op, args: kernel_worker._settled(worker.handle(op, args), args)  # noqa: E731 - as serve() does
    status, (out, handle) = reply("call", call)
    assert status == "ok" and handle is not None  # on a device that reports nothing
    synced = []

    def synchronize(device=None):
        synced.append(device)
        raise RuntimeError("CUDA error: misaligned address" + BOILERPLATE)

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    for op, args in (("call", call), ("backward", (handle, torch.ones_like(out))),
                     ("call", ("naive", "fn", (inputs.q,), {}, None))):  # the last raises (a TypeError) first
        status, message = reply(op, args)
        assert status == "fault" and "misaligned address" in message, (op, status, message)
    assert synced == [0, 0, 0]  # the current device; on a GPU also each device the tensors are on
