"""Running a check so that a crashing, hanging or out-of-memory backend cannot end or corrupt the run.

``Isolated`` (the default) keeps one worker process (``multiprocessing``, spawn start method) that runs
cases one after another, and waits for each with a time limit:
- the worker dies (SIGSEGV, SIGABRT...): the case is ``crashed``, with the signal and the tail of the
  worker's stderr (where ``faulthandler`` wrote the fatal error), and a fresh worker takes the next case;
- the limit passes: the worker is killed, the case has ``timed out``, a fresh worker takes the next;
- a CUDA error that poisons the context (illegal memory access, device-side assert): ``crashed``, and
  the worker is replaced, since every later CUDA call in it would fail;
- out of memory: ``oom``, a result of its own; the worker frees memory and goes on.
``InProcess`` runs the check in the pytest process (``--isolation=none``): cheaper, but it cannot
survive a hard crash or stop a hang.

A worker loads the backend by the same name or import string the user gave, and rebuilds the case from
its id, so nothing but plain data crosses the pipe.
"""

from __future__ import annotations

import faulthandler
import multiprocessing
import os
import resource
import signal
import tempfile
from dataclasses import dataclass

from conformance.backend import Backend, DeviceFault, OutOfMemory, Unsupported
from conformance.case import Case
from conformance.verdict import Verdict

# Outcome kinds beyond a verdict; "not run" is decided by the plugin (a backend that keeps crashing).
VERDICT, UNSUPPORTED, OOM, CRASHED, TIMED_OUT = "verdict", "unsupported", "oom", "crashed", "timed out"
STARTUP_LIMIT = 300  # seconds for a worker to import torch and the suite; not counted in any case's limit


@dataclass
class Outcome:
    kind: str
    verdict: Verdict | None = None
    message: str = ""


def _run_here(check: str, backend: Backend, case: Case, device: str, options: dict) -> tuple[Outcome, bool]:
    """The outcome, and whether this process is still fit to run the next case."""
    from conformance.checks import execute

    try:
        return Outcome(VERDICT, execute(check, backend, case, device, options)), True
    except Unsupported as exc:
        return Outcome(UNSUPPORTED, message=str(exc)), True
    except OutOfMemory as exc:
        _release_memory()
        return Outcome(OOM, message=str(exc)), True
    except DeviceFault as exc:
        return Outcome(CRASHED, message=f"CUDA error (context poisoned): {exc}"), False


def _release_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class InProcess:
    def run(self, check: str, backend: Backend, case: Case, device: str, timeout: float, options: dict) -> Outcome:
        return _run_here(check, backend, case, device, options)[0]

    def close(self) -> None:
        pass


def _serve(conn, log_path: str) -> None:
    """The worker's loop: one request (check, backend spec, case id, device, options) at a time."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crashing kernel must not write a core dump of GBs
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND)
    os.dup2(log, 1)  # a kernel's prints and a fatal error's traceback go to the log, not the terminal
    os.dup2(log, 2)
    faulthandler.enable()
    from conformance import checks, registry  # noqa: F401 - imported before "ready", outside any case's time limit

    conn.send("ready")
    backends: dict[str, Backend] = {}
    while True:
        try:
            check, spec, case_id, device, options = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if spec not in backends:
            backends[spec] = registry.load(spec)
        outcome, healthy = _run_here(check, backends[spec], Case.from_id(case_id), device, options)
        verdict = outcome.verdict
        conn.send((outcome.kind, None if verdict is None else verdict.as_dict(), outcome.message))
        if not healthy:
            return


class Isolated:
    def __init__(self):
        self._context = multiprocessing.get_context("spawn")
        self._process = None
        self._conn = None
        self._log = tempfile.NamedTemporaryFile(prefix="attn-conformance-worker-", suffix=".log", delete=False)

    def _start(self) -> None:
        parent, child = self._context.Pipe()
        self._process = self._context.Process(target=_serve, args=(child, self._log.name), daemon=True,
                                              name="attn-conformance-worker")
        self._process.start()
        child.close()
        self._conn = parent
        if not (parent.poll(STARTUP_LIMIT) and parent.recv() == "ready"):
            raise RuntimeError(f"the isolation worker did not start within {STARTUP_LIMIT} s; see {self._log.name}")

    def _log_tail(self, start: int) -> str:
        with open(self._log.name, "rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace")
        lines = [line for line in text.splitlines() if line.strip()]
        return " | ".join(lines[:3] + (["..."] if len(lines) > 3 else []))[:600]

    def _stop(self) -> int | None:
        if self._process is not None:
            if self._process.is_alive():
                self._process.kill()
            self._process.join(10)
            code = self._process.exitcode
            self._conn.close()
            self._process = self._conn = None
            return code
        return None

    def run(self, check: str, backend: Backend, case: Case, device: str, timeout: float, options: dict) -> Outcome:
        if self._process is None or not self._process.is_alive():
            self._stop()
            self._start()
        log_start = os.path.getsize(self._log.name)
        self._conn.send((check, backend.name, case.id, device, options))
        if not self._conn.poll(timeout):
            self._stop()
            return Outcome(TIMED_OUT, message=f"no result within {timeout:g} s; the worker was killed")
        try:
            kind, verdict, text = self._conn.recv()
        except (EOFError, OSError):  # the worker died mid-case: its end of the pipe closed
            self._process.join(10)
            code = self._stop()
            tail = self._log_tail(log_start)
            return Outcome(CRASHED, message=f"worker died with {_describe_exit(code)}" + (f": {tail}" if tail else ""))
        if kind == CRASHED:
            self._stop()
        restored = None if verdict is None else Verdict.from_dict(check, backend.name, case, device, verdict)
        return Outcome(kind, restored, text)

    def close(self) -> None:
        self._stop()
        os.unlink(self._log.name)


def _describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"{signal.Signals(-code).name} (signal {-code})"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"
