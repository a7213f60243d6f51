"""The judge never shares a process with the kernel: sly kernels (tests/sly.py) cannot fake a pass,
escape the run, outlive it, or have their verdict attributed to another case."""

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conformance import isolation, kernel_client, kernel_side, results
from conformance.backend import KernelCrashed, KernelTimedOut, run_kernel_side
from conformance.case import Case
from conformance.inputs import make_inputs
from conformance.kernel_client import KernelProcess
from conformance.options import RunOptions

SLY = (Path(__file__).parent / "sly.py").read_text()
CASES = "b2_q65_k129_h8_kv2_d64_fp32_seed1,b1_q17_k17_h4_d40_fp64_seed2,b2_q65_k65_h4_d64_fp32_bhsd_seed3," \
        "b2_q128_k128_h4_d64_fp32_x16_seed4"
SUITE = ("--pyargs", "conformance.suite", "-p", "no:cacheprovider", "--tier=quick", "--fuzz=off")


def run_sly(pytester, kernel, *extra):
    pytester.makepyfile(sly=SLY)
    result = pytester.runpytest_subprocess(*SUITE, f"--backend=sly.py:{kernel}", *extra)
    return result, results.read(pytester.path / "conformance-results.jsonl")


def test_a_kernel_cannot_make_its_wrong_answers_pass(pytester):
    """Patching the suite or torch where the kernel runs, stealing the reference by gc, or refusing the
    cases it gets wrong (a plain function may not refuse): every case still fails (one run for all)."""
    kernels = ("patches_the_suite", "relies_on_patched_softmax", "steals_the_reference", "refuses_what_it_gets_wrong")
    result, journal = run_sly(pytester, ",sly.py:".join(kernels), "--check=forward", f"--case={CASES}")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    outcomes = {k: [r["outcome"] for r in journal.cases if r["backend"] == f"sly.py:{k}"] for k in kernels}
    assert outcomes == {k: ["failed"] * 4 for k in kernels}
    refused = next(r for r in journal.cases if r["backend"] == "sly.py:refuses_what_it_gets_wrong")
    assert "refused a case inside its declaration" in refused["findings"][0]["message"]  # GQA refused


def test_a_reply_that_would_run_code_in_the_judge_is_refused(pytester, monkeypatch, tmp_path):
    monkeypatch.setenv("SLY_PWNED", str(tmp_path / "pwned"))
    cases = "b2_q17_k17_h4_d32_fp32_seed1,b2_q33_k33_h4_d32_fp32_seed2"
    result, journal = run_sly(pytester, "replies_with_code", "--check=forward", f"--case={cases}")
    assert not (tmp_path / "pwned").exists()
    assert result.ret == pytest.ExitCode.USAGE_ERROR  # not following the calling convention
    second = journal.cases[1]["findings"][0]  # the first call installed the patch
    assert second["property"] == "contract" and "does not load it" in second["message"]


def test_a_huge_view_is_refused_before_the_judge_copies_it(pytester):
    result, journal = run_sly(pytester, "returns_a_huge_view", "--check=forward", "--case=b2_q17_k17_h4_d32_fp32_seed1")
    assert result.ret == pytest.ExitCode.USAGE_ERROR and "more than q's" in journal.cases[0]["findings"][0]["message"]


def test_text_that_mentions_memory_is_not_an_out_of_memory(pytester):
    result, journal = run_sly(pytester, "says_out_of_memory", "--check=forward", "--case=b2_q17_k17_h4_d32_fp32_seed1")
    assert [r["outcome"] for r in journal.cases] == ["failed"]
    assert "raised" in journal.cases[0]["findings"][0]["property"]


def test_a_kernel_ending_its_process_is_a_crash_not_a_pass(pytester):
    result, journal = run_sly(pytester, "exits_cleanly", "--check=forward", "--case=b2_q17_k17_h4_d32_fp32_seed1")
    assert result.ret == pytest.ExitCode.TESTS_FAILED and journal.complete
    assert journal.cases[0]["outcome"] == "crashed" and "exit code 0" in journal.cases[0]["findings"][0]["message"]


def test_fork_then_crash_is_crashed_and_the_child_is_killed(pytester):
    start = time.monotonic()
    result, journal = run_sly(pytester, "forks_then_crashes", "--check=forward", "--case=b2_q17_k17_h4_d32_fp32_seed1",
                              "--case-timeout=300")
    assert journal.cases[0]["outcome"] == "crashed" and "SIGABRT" in journal.cases[0]["findings"][0]["message"]
    assert time.monotonic() - start < 250  # decided when the process died, not at the time limit


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with open(f"/proc/{pid}/stat") as f:  # a zombie that nobody reaps yet is gone too
        return f.read().split(") ")[1].startswith("Z")


def _wait_for(path: Path, seconds: float = 120) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return [int(x) for x in path.read_text().split()]
        time.sleep(0.1)
    raise AssertionError(f"{path} was never written")


def test_a_timeout_kills_what_the_kernel_started(pytester, monkeypatch, tmp_path):
    monkeypatch.setenv("SLY_PID_FILE", str(tmp_path / "pids"))
    result, journal = run_sly(pytester, "hangs_with_a_child", "--check=forward", "--case=b2_q17_k17_h4_d32_fp32_seed1",
                              "--case-timeout=3")
    assert journal.cases[0]["outcome"] == "timed out"
    worker, child = _wait_for(tmp_path / "pids")
    time.sleep(0.5)
    assert _gone(worker) and _gone(child)


def test_sigterm_to_the_run_kills_a_hung_kernel_and_its_children(pytester, tmp_path):
    pytester.makepyfile(sly=SLY)
    env = {**os.environ, "SLY_PID_FILE": str(tmp_path / "pids")}
    run = subprocess.Popen([sys.executable, "-m", "pytest", *SUITE, "--backend=sly.py:hangs_with_a_child",
                            "--check=forward", "--case=b2_q17_k17_h4_d32_fp32_seed1"], cwd=pytester.path, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    worker, child = _wait_for(tmp_path / "pids")
    run.send_signal(signal.SIGTERM)
    assert run.wait(60) != 0
    time.sleep(0.5)
    assert _gone(worker) and _gone(child)
    journal = results.read(pytester.path / "conformance-results.jsonl") if (pytester.path / "conformance-results.jsonl").exists() else None
    assert journal is None or not journal.complete  # an interrupted run is never read as finished


def test_an_interrupted_wait_replaces_the_process_and_replies_stay_with_their_requests(tmp_path):
    """What pytest-timeout's signal method does: an exception in the middle of a wait."""
    (tmp_path / "slow.py").write_text("import time\ntime.sleep(3)\ndef fn(q, k, v, **kw): return q\n")
    kernel = KernelProcess(call_timeout=60)
    try:
        kernel.describe(["naive"])
        first = kernel._process.pid

        def interrupt(signum, frame):
            raise TimeoutError("interrupted by a test timeout")

        previous = signal.signal(signal.SIGALRM, interrupt)
        try:
            signal.setitimer(signal.ITIMER_REAL, 0.5)
            with pytest.raises(TimeoutError):
                kernel.describe([f"{tmp_path}/slow.py:fn"])  # its reply would come 3 s later
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        described = kernel.describe(["tiled"])  # answered by a fresh process, with its own reply
        assert list(described) == ["tiled"] and kernel._process.pid != first
    finally:
        kernel.close()


def test_a_timing_runs_in_a_process_started_for_its_case(monkeypatch):
    """What a speed case times must not depend on what earlier cases compiled or autotuned in the kernel's
    process: a procedure in kernel_side.FRESH (the speed check's timing) gets a process started for its
    key (the case), kept for the next one with that key (the case's other mode) while nothing else runs
    there; the other procedures share the process."""
    assert kernel_side.FRESH["speed_time"]("flash", [], Case(), "cuda", "fwd", [], {}) == ("flash", Case().id)
    # a procedure that runs on the CPU stands in for the timing
    monkeypatch.setattr(kernel_side, "FRESH", {"memory_peak": lambda case, device, backward: case.id})
    kernel = KernelProcess(call_timeout=60)
    try:
        backend = kernel.backend("naive", kernel.describe(["naive"])["naive"])
        case = Case(batch=1, seqlen_q=8, seqlen_k=8, nheads=1, head_dim=8)
        other = dataclasses.replace(case, seqlen_k=9)
        inputs = make_inputs(case, "cpu")
        shared = ("dropout_samples", (inputs.q, inputs.k, inputs.v, case, 0.0, [None]))
        pids = []
        for name, args in (shared, shared, ("memory_peak", (case, "cpu", False)), ("memory_peak", (case, "cpu", True)),
                           ("memory_peak", (other, "cpu", False)), shared, ("memory_peak", (other, "cpu", False))):
            assert run_kernel_side(backend, name, *args) is not None
            pids.append(kernel._process.pid)
        # the same process for shared work; a new one for a case; kept for its next mode; new for another
        # case; the case's process used for other work is not fresh for it any more
        assert pids[0] == pids[1] != pids[2] == pids[3] != pids[4] == pids[5] != pids[6]
    finally:
        kernel.close()


def test_timeouts_and_crashes_surface_as_their_own_exceptions(tmp_path):
    (tmp_path / "k.py").write_text("import time, os\n"
                                   "def hang(q, k, v, **kw): time.sleep(600)\n"
                                   "def die(q, k, v, **kw): os.abort()\n")
    runner = isolation.Isolated(call_timeout=2)
    try:
        rows = {r.spec: r.backend for r in runner.describe([f"{tmp_path}/k.py:hang", f"{tmp_path}/k.py:die"])}
        case = Case(batch=1, seqlen_q=4, seqlen_k=4, nheads=1, head_dim=8)
        hung = runner.run("forward", rows[f"{tmp_path}/k.py:hang"], case, "cpu", RunOptions())
        died = runner.run("forward", rows[f"{tmp_path}/k.py:die"], case, "cpu", RunOptions())
        assert hung.outcome == "timed out" and "did not return within 2 s" in hung.message
        assert died.outcome == "crashed" and "SIGABRT" in died.message
    finally:
        runner.close()
    assert KernelTimedOut and KernelCrashed  # the exceptions the runner turns into these outcomes


def test_a_kernel_process_leaves_no_file_behind_and_its_log_still_explains_a_crash(tmp_path, monkeypatch):
    """The log and the compile clock lose their names once the kernel's process has opened them: a judge
    that is killed leaves no file in the temporary folder (runs killed by CI timeouts left an empty log
    each). The judge reads the log through its open file: a crash's message still quotes it."""
    import tempfile

    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    (tmp_path / "k.py").write_text("import os\n"
                                   "def dies(q, k, v, **kw):\n"
                                   "    print('the last words of the kernel', flush=True)\n"
                                   "    os._exit(3)\n")
    runner = isolation.Isolated(call_timeout=30)
    try:
        [row] = runner.describe([f"{tmp_path}/k.py:dies"])
        assert list(folder.iterdir()) == []  # the process runs: a SIGKILL to the judge now leaves nothing
        case = Case(batch=1, seqlen_q=4, seqlen_k=4, nheads=1, head_dim=8)
        died = runner.run("forward", row.backend, case, "cpu", RunOptions())
        assert died.outcome == "crashed" and "the last words of the kernel" in died.message
        assert list(folder.iterdir()) == []
    finally:
        runner.close()


COMPILING = """import time
import torch


def _sleeps(seconds):  # a torch.compile backend that takes its time, as inductor does on a busy machine
    def backend(gm, example_inputs):
        time.sleep(seconds)
        return gm.forward
    return backend


def _attention(q, k, v):
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    return torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, -1).matmul(v).transpose(1, 2)


_slow, _endless = (torch.compile(_attention, backend=_sleeps(s)) for s in (5, 600))


def compiles_slowly(q, k, v, **kwargs):
    return _slow(q, k, v)


def compiles_forever(q, k, v, **kwargs):
    return _endless(q, k, v)


for _fn in (compiles_slowly, compiles_forever):
    _fn.conformance_capabilities = {"dtypes": ["fp32"], "causal": [], "backward": False}
"""


def test_torch_compile_time_is_not_counted_as_a_hang_up_to_the_limit_again(tmp_path):
    """A first call that compiles for longer than the case's limit is not a hang (compile_clock.py); a
    compilation that goes on past twice the limit still times out."""
    (tmp_path / "k.py").write_text(COMPILING)
    runner = isolation.Isolated(call_timeout=3)
    try:
        specs = [f"{tmp_path}/k.py:compiles_slowly", f"{tmp_path}/k.py:compiles_forever"]
        rows = {r.spec: r.backend for r in runner.describe(specs)}
        case = Case(batch=1, seqlen_q=4, seqlen_k=4, nheads=1, head_dim=8)
        slow, endless = (runner.run("forward", rows[s], case, "cpu", RunOptions()) for s in specs)
        assert slow.outcome == "passed"
        assert endless.outcome == "timed out" and "within 3 s, 3 s of torch.compile's compilation not counted" \
            in endless.message
    finally:
        runner.close()


def test_the_kernel_module_is_never_imported_by_the_judge(pytester):
    pytester.makepyfile(sly=SLY, conftest="""
import sys
def pytest_sessionfinish(session):
    assert not any("sly" in name for name in sys.modules), "the judge imported the kernel's module"
""")
    result = pytester.runpytest_subprocess(*SUITE, "--backend=sly.py:patches_the_suite", "--check=forward",
                                           "--case=b2_q17_k17_h4_d32_fp32_seed1")
    assert result.ret == pytest.ExitCode.TESTS_FAILED and "the judge imported" not in result.stdout.str()


@pytest.mark.parametrize("declaration, message", [
    ('{"head_dim_multiple": 0}', "head_dim_multiple must be a whole number >= 1, not 0"),
    ('{"backward": "false"}', "backward must be true or false, not 'false'"),
    ('{"varlen": True}', "declares varlen but has no varlen_fn"),
])
def test_capability_values_of_the_wrong_type_are_usage_errors(pytester, declaration, message):
    pytester.makepyfile(k=f"from conformance.backends.naive import attention as f\n"
                          f"def kernel(*a, **kw): return f(*a, **kw)\nkernel.conformance_capabilities = {declaration}\n")
    result = pytester.runpytest_subprocess(*SUITE, "--backend=k.py:kernel", "--check=forward")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*{message}*"])


def test_a_backend_with_no_passing_case_is_not_a_pass(pytester):
    pytester.makepyfile(k="from conformance.backends.naive import attention as f\n"
                          "def kernel(*a, **kw): return f(*a, **kw)\n"
                          "kernel.conformance_capabilities = {'dtypes': ['fp16'], 'head_dims': [512], 'head_dim_max': 512,"
                          " 'seqlen_multiple': 8192, 'max_seqlen': 4096}\n")  # no realisable case: every seqlen > max
    result = pytester.runpytest_subprocess(*SUITE, "--backend=k.py:kernel")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*nothing tested: no case of backend k.py:kernel passed*"])


def test_the_wire_hands_shared_memory_over_with_the_message_and_refuses_malformed_ones():
    """A tensor crosses as its shared memory, its descriptor passed with the message (no resource-sharer
    thread and handshake per storage); announced descriptors that never come, or a storage larger than
    its memory, are refused, never waited for or mapped."""
    import multiprocessing
    import pickle
    from multiprocessing import reduction, resource_sharer

    import torch

    from conformance import kernel_client as kc

    a, b = multiprocessing.Pipe()
    sa, sb = kc.connection_socket(a), kc.connection_socket(b)
    fds = []
    try:
        q = torch.arange(12.0).reshape(3, 4)
        kc.send(a, sa, (7, "call", (q[1:], {"scale": 0.5})))
        request_id, op, (view, kwargs) = kc.receive(b, sb, kc._ReplyUnpickler, 5)
        assert (request_id, op, kwargs) == (7, "call", {"scale": 0.5}) and torch.equal(view, q[1:])
        view[0, 0] = -1.0  # the same memory: what the kernel writes into its inputs, the judge sees
        assert q[1, 0] == -1.0
        assert resource_sharer._resource_sharer._listener is None  # no hand-over thread was started
        a.send_bytes((2).to_bytes(4, "little") + pickle.dumps(None))  # two descriptors announced, none sent
        with pytest.raises(kc.ProtocolError, match="did not follow"):
            kc.receive(b, sb, kc._ReplyUnpickler, 0.1)
        small = torch.zeros(4)
        kc.send(a, sa, small)
        assert b.poll(5)
        data = b.recv_bytes()
        fds = reduction.recvfds(sb, 1)
        with pytest.raises(pickle.UnpicklingError, match="shared memory of"):
            kc.storage_from_fd(fds, ("fd", 0, 1 << 20))  # 1 MiB claimed of 16 bytes
        with pytest.raises(pickle.UnpicklingError, match="refused persistent id"):
            kc.storage_from_fd(fds, ("fd", 1, 16))
        assert data[:4] == (1).to_bytes(4, "little")
    finally:
        for x in (a, b, sa, sb):
            x.close()
        for fd in fds:
            os.close(fd)


def test_the_judge_never_waits_on_an_event_of_the_kernels_process(monkeypatch):
    """A CUDA tensor from the kernel's process is rebuilt with event_sync_required False: a stream made to
    wait on the sender's event hung the judge when that event sat behind a fault (README, "GPU
    backends"). The pickle is the one torch writes for a CUDA tensor (reduce_tensor), replayed here
    without a GPU."""
    import io
    import pickle

    import torch
    import torch.multiprocessing.reductions as reductions

    from conformance import kernel_client as kc

    args = (torch.Tensor, (2, 3), (3, 1), 0, torch.UntypedStorage, torch.float16, 0, b"handle", 0, 0, False,
            b"counter", 0, b"event", True)

    class Reply:
        def __reduce__(self):
            return reductions.rebuild_cuda_tensor, args

    data = pickle.dumps(Reply())
    seen = []
    rebuilt = torch.empty(0)  # no memory: nothing for the storage check below to ask the driver
    monkeypatch.setattr(reductions, "rebuild_cuda_tensor", lambda *a: seen.append(a) or rebuilt)
    monkeypatch.setattr(kc, "cuda_reply_problem", lambda args, sender: "")  # its own test, below
    assert kc._ReplyUnpickler(io.BytesIO(data)).load() is rebuilt
    assert seen == [args[:-1] + (False,)]
    with pytest.raises(pickle.UnpicklingError, match="14 arguments"):
        kc._rebuild_cuda_tensor_unsynced(None, *args[:-1])


def test_a_cuda_storage_is_taken_only_within_the_allocation_its_handle_maps(monkeypatch):
    """torch maps a CUDA IPC handle's allocation and takes the storage's size and offset as told; a reply
    claiming more lets a view reach memory never shared (the judge's copy faults, or reads its own
    memory). The extent is checked against the driver's (base, size) of the allocation holding it."""
    from conformance.kernel_client import outside_its_allocation

    base, size = 0x7000_0000, 2 << 20
    assert outside_its_allocation(base + 512, 1024, 512, (base, size)) == ""
    assert outside_its_allocation(base, size, 0, (base, size)) == ""
    assert "ends past it" in outside_its_allocation(base + 512, size, 512, (base, size))
    assert "lies in another" in outside_its_allocation(base + 4096, 16, 512, (base, size))  # an adjacent one
    assert "no allocation" in outside_its_allocation(base + 512, 16, 512, None)

    import io
    import pickle

    import torch.multiprocessing.reductions as reductions
    from conformance import kernel_client as kc

    rebuilt = torch.ones(4)
    monkeypatch.setattr(reductions, "rebuild_cuda_tensor", lambda *a: rebuilt)
    monkeypatch.setattr(kc, "cuda_reply_problem", lambda args, sender: "")  # its own test, below
    pointer = rebuilt.untyped_storage().data_ptr()
    args = (torch.Tensor, (4,), (1,), 0, torch.UntypedStorage, torch.float32, 0, b"handle", 16, 64, False, b"c", 0,
            b"event", True)
    for allocation, taken in (((pointer - 64, 80), True), ((pointer - 64, 79), False), (None, False)):
        monkeypatch.setattr(kc, "allocation_of", lambda p, device, a=allocation: a)
        if taken:
            assert kc._rebuild_cuda_tensor_unsynced(7, *args) is rebuilt
        else:
            with pytest.raises(pickle.UnpicklingError, match="a CUDA storage"):
                kc._rebuild_cuda_tensor_unsynced(7, *args)
    with pytest.raises(pickle.UnpicklingError, match="said to be 32"):  # a storage of another size than claimed
        kc._rebuild_cuda_tensor_unsynced(7, *args[:8], 32, *args[9:])


def test_a_cuda_tensors_rebuild_arguments_must_be_what_torch_writes_for_the_senders_own_memory(monkeypatch):
    """Checked before torch acts on them: torch maps what a handle names (an expandable segment's handle
    names a process and descriptors to take), decrements a counter at any offset of the file the sender
    names, and gives a storage with no handle memory of the judge's own."""
    from conformance import kernel_client as kc

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    good = (torch.Tensor, torch.Size((2, 3)), (3, 1), 0, torch.storage.TypedStorage, torch.float16, 0,
            b"\x02c" + bytes(64), 2 << 20, 4096, False, b"/torch_4242_1965_0", 17, bytes(64), True)
    assert kc.cuda_reply_problem(good, 4242) == ""
    assert kc.cuda_reply_problem(good[:7] + (bytes(64),) + good[8:], 4242) == ""  # a bare cudaIpcMemHandle_t
    empty = good[:1] + (torch.Size((0, 3)),) + good[2:7] + (None, 0) + good[9:]
    assert kc.cuda_reply_problem(empty, 4242) == ""
    bad = {"classes": (1, torch.Size), "view": (3, -0.5), "dtype": (5, "float16"),
           "no memory": (7, None), "no cudaMalloc": (7, b"\x02e" + bytes(64)), "short handle": (7, b"\x02c"),
           "count of bytes": (8, -1), "offset": (9, 1.5), "other file": (11, b"/torch_999_1965_0"),
           "slot past the file": (12, 10000), "negative slot": (12, -1), "event": (13, "e")}
    for what, (index, value) in bad.items():
        assert kc.cuda_reply_problem(good[:index] + (value,) + good[index + 1:], 4242), what
    assert "did not make" in kc.cuda_reply_problem(good, None)  # no sender known: no counter file is its
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "no CUDA device" in kc.cuda_reply_problem(good, 4242)


def test_the_kernels_process_keeps_its_cuda_memory_out_of_expandable_segments(monkeypatch):
    """Their shares are not taken by the judge (above), so the kernel's process never makes them, whatever
    the environment asks."""
    from conformance import kernel_worker

    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128,expandable_segments:True")
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    kernel_worker._no_expandable_segments()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128,expandable_segments:False"
    assert "PYTORCH_ALLOC_CONF" not in os.environ  # nothing set where nothing asked for them


def test_the_judge_learns_that_a_backend_compiles_per_variant(tmp_path):
    """The fuzz test draws a compiled backend's variants from the grid's (fuzz.py): the judge
    must learn ``compiled`` from the kernel's process, where the backend is loaded (flex is declared
    there on a machine without CUDA too, unavailable); a plain function says it with an attribute."""
    (tmp_path / "k.py").write_text("def mine(q, k, v, **kw): return q\nmine.conformance_compiled = True\n"
                                   "def plain(q, k, v, **kw): return q\n")
    kernel = KernelProcess(call_timeout=60)
    try:
        specs = ["flex", "naive", f"{tmp_path}/k.py:mine", f"{tmp_path}/k.py:plain"]
        described = kernel.describe(specs)
        assert [kernel.backend(s, described[s]).compiled for s in specs] == [True, False, True, False]
    finally:
        kernel.close()


def _counter_file(tmp_name: str, values: dict[int, int]):
    """A CUDA IPC reference-count file as torch lays it out (a 64-byte header, then int64 slots)."""
    path = Path("/dev/shm") / tmp_name
    data = bytearray(kernel_client.SLOT_HEADER_BYTES + 8 * 16)
    for slot, value in values.items():
        at = kernel_client.SLOT_HEADER_BYTES + 8 * slot
        data[at:at + 8] = value.to_bytes(8, "little", signed=True)
    path.write_bytes(bytes(data))
    return path


def _slots_of(path: Path, slots) -> list[int]:
    data = path.read_bytes()
    return [int.from_bytes(data[kernel_client.SLOT_HEADER_BYTES + 8 * s:][:8], "little", signed=True) for s in slots]


def _decrement_as_torch_does(monkeypatch, calls: list):
    """torch's release (a CUDA build only): one non-atomic decrement of the slot, nothing if the file is gone."""
    def release(handle: bytes, offset: int):
        calls.append((handle, offset))
        path = Path("/dev/shm") / handle.decode().lstrip("/")
        if path.exists():
            [value] = _slots_of(path, [offset])
            data = bytearray(path.read_bytes())
            at = kernel_client.SLOT_HEADER_BYTES + 8 * offset
            data[at:at + 8] = (value - 1).to_bytes(8, "little", signed=True)
            path.write_bytes(bytes(data))

    monkeypatch.setattr(torch.UntypedStorage, "_release_ipc_counter_cuda", release, raising=False)


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="torch's IPC counters live in /dev/shm (Linux)")
def test_a_dead_processs_cuda_ipc_slots_are_released_once_and_only_those_it_held(monkeypatch):
    """A killed receiver never decrements its slots, so the judge's CUDA inputs stayed allocated (1.5 GiB per
    timed-out call, H100). The judge releases the slots still at 1; one its receiver released (0) is left
    alone, since a second decrement wraps it and the block is never freed; so is a file already gone."""
    path = _counter_file(f"attn-conformance-test-{os.getpid()}", {0: 1, 1: 0, 2: 1, 3: -1})
    handle = b"/" + path.name.encode()
    calls = []
    _decrement_as_torch_does(monkeypatch, calls)
    try:
        slots = [(handle, 0), (handle, 1), (handle, 2), (handle, 3), (b"/attn-conformance-gone", 0)]
        assert kernel_client.release_cuda_slots(slots) == 2
        assert calls == [(handle, 0), (handle, 2)]
        assert _slots_of(path, [0, 1, 2, 3]) == [0, 0, 0, -1]
        assert kernel_client.release_cuda_slots(slots) == 0  # released once: never wrapped below zero
        assert _slots_of(path, [0, 1, 2, 3]) == [0, 0, 0, -1]
    finally:
        path.unlink()


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="torch's IPC counters live in /dev/shm (Linux)")
def test_the_slots_sent_to_a_process_are_released_when_it_is_killed_not_before(monkeypatch, tmp_path):
    """What a request shares (``send``'s slots) is released once its process is dead: after a timeout's kill,
    not while the process lives."""
    path = _counter_file(f"attn-conformance-test-{os.getpid()}", {5: 1})
    handle = b"/" + path.name.encode()
    calls = []
    _decrement_as_torch_does(monkeypatch, calls)
    real_send = kernel_client.send

    def send(conn, sock, obj, cuda_slots=None):  # as if each request shared a CUDA tensor with that slot
        real_send(conn, sock, obj, cuda_slots)
        if cuda_slots is not None:
            cuda_slots.append((handle, 5))

    monkeypatch.setattr(kernel_client, "send", send)
    (tmp_path / "k.py").write_text("import time\ndef hang(q, k, v, **kw): time.sleep(600)\n")
    runner = isolation.Isolated(call_timeout=2)
    try:
        [row] = runner.describe([f"{tmp_path}/k.py:hang"])
        assert calls == [] and _slots_of(path, [5]) == [1]  # the describe request's slot: its process lives
        case = Case(batch=1, seqlen_q=4, seqlen_k=4, nheads=1, head_dim=8)
        assert runner.run("forward", row.backend, case, "cpu", RunOptions()).outcome == "timed out"
        assert calls == [(handle, 5)] and _slots_of(path, [5]) == [0]  # killed: released, once
    finally:
        runner.close()
        path.unlink()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA IPC: a GPU's")
def test_a_killed_kernel_process_leaves_none_of_the_judges_cuda_inputs_allocated(tmp_path):
    """On the GPU the kernel works on the judge's tensors through CUDA IPC. Each timed-out call kept its
    inputs allocated until the run ended (1.5 GiB per call of three 0.5 GiB inputs, H100); released once
    the process is dead, they are freed. The same tensor sent to a hung process, then to its
    replacement, stays whole for the replacement: only the dead process's share is released."""
    (tmp_path / "k.py").write_text("import time\n"
                                   "def hang(q, k, v, **kw): time.sleep(600)\n"
                                   "def doubles(q, k, v, **kw): return q * 2\n")
    kernel = KernelProcess(call_timeout=3)
    specs = [f"{tmp_path}/k.py:hang", f"{tmp_path}/k.py:doubles"]
    described = kernel.describe(specs)
    hang, doubles = (kernel.backend(spec, described[spec]).fn for spec in specs)
    try:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        for _ in range(2):
            q, k, v = (torch.randn(1, 4096, 16, 128, device="cuda", dtype=torch.float16) for _ in range(3))
            with pytest.raises(KernelTimedOut):
                hang(q, k, v)
            assert torch.equal(doubles(q, k, v), q * 2)  # a fresh process, on the tensors the dead one had
            del q, k, v
        kernel.close()
        torch.cuda.synchronize()
        torch.cuda.ipc_collect()
        assert torch.cuda.memory_allocated() == before
    finally:
        kernel.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA IPC: a GPU's")
@pytest.mark.parametrize("kernel, message", [("claims_memory_it_never_shared", "a CUDA storage"),
                                             ("claims_no_memory", "elements but no memory")])
def test_a_cuda_reply_claiming_memory_it_never_shared_is_refused_and_the_judge_goes_on(pytester, kernel, message):
    """The kernel patches its process' reply: its output's storage claimed 1 GiB larger and the view moved
    into the claimed part (copied, it would read past the allocation the kernel shared), or no memory shared
    at all (torch would give it the judge's own). Refused as not following the convention, and its process
    replaced: the next backend's cases pass."""
    case = "b2_q128_k128_h4_d64_fp16_seed1"
    result, journal = run_sly(pytester, f"{kernel},sdpa-math", "--check=forward", f"--case={case}", "--device=cuda")
    outcomes = {r["backend"]: r for r in journal.cases}
    sly = outcomes[f"sly.py:{kernel}"]
    assert sly["findings"][0]["property"] == "contract" and message in sly["findings"][0]["message"], sly
    assert outcomes["sdpa-math"]["outcome"] == "passed", outcomes["sdpa-math"]

