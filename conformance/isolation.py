"""Where the kernel runs, and what one case ends in.

``Isolated`` (the default, ``--isolation=process``): the kernel runs in its own process
(kernel_worker.py) and the checks run here, in the judge's process, calling it through
kernel_client.py. So a crashing, hanging or out-of-memory kernel cannot end or corrupt the run, and
nothing the kernel does in its process can change the reference it is compared with or the verdict:
- its process dies (SIGSEGV, SIGABRT, an exit): ``crashed``, with the signal and the fatal error's
  report (``faulthandler``); a fresh process takes the next call;
- a call does not return within the limit: ``timed out``; the process and its children are killed;
- a CUDA error that poisons the context: ``crashed``, and the process is replaced;
- out of memory (the allocator's own error): ``oom``, a result of its own.
``InProcess`` (``--isolation=none``, for debugging) loads the kernel here: cheaper, but it cannot
survive a hard crash or stop a hang, and its verdicts are not protected from the kernel.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from conformance import registry
from conformance.backend import Backend, DeviceFault, KernelCrashed, KernelTimedOut, OutOfMemory, Unsupported
from conformance.case import Case
from conformance.checks import HarnessError, execute
from conformance.kernel_client import KernelProcess
from conformance.options import RunOptions
from conformance.outcomes import Outcome
from conformance.verdict import Verdict


@dataclass
class CaseResult:
    outcome: Outcome
    verdict: Verdict | None = None
    message: str = ""


@dataclass
class Described:
    """One --backend value: its Backend, or why it cannot be had (``error``), and why it cannot run here."""

    spec: str
    backend: Backend | None
    error: str = ""
    unavailable: list[str] = dataclasses.field(default_factory=list)


def _judge(check: str, backend: Backend, case: Case, device: str, options: RunOptions) -> CaseResult:
    try:
        return _result(check, backend, case, device, options)
    finally:
        if options.gpu_shared_by > 1:
            _release_device_memory()


def _result(check: str, backend: Backend, case: Case, device: str, options: RunOptions) -> CaseResult:
    try:
        verdict = execute(check, backend, case, device, options)
    except Unsupported as exc:
        return CaseResult(Outcome.SKIPPED, message=str(exc))
    except OutOfMemory as exc:
        return CaseResult(Outcome.OOM, message=str(exc))
    except DeviceFault as exc:
        return CaseResult(Outcome.CRASHED, message=f"CUDA error (context poisoned): {exc}")
    except KernelCrashed as exc:
        return CaseResult(Outcome.CRASHED, message=str(exc))
    except KernelTimedOut as exc:
        return CaseResult(Outcome.TIMED_OUT, message=str(exc))
    except HarnessError as exc:
        return CaseResult(Outcome.HARNESS_ERROR, message=f"harness error (a bug in attention-conformance, not in the "
                                                         f"backend; please report it): {exc}")
    return CaseResult(Outcome.PASSED if verdict.passed else Outcome.FAILED, verdict)


def _release_device_memory() -> None:
    """Return what torch's caching allocator holds unused to the GPU: on a GPU that pytest-xdist workers
    share, each judge and kernel process keeping the peak of its largest case (a float64 reference at
    4096 keys holds gigabytes) made the others run out of memory on an 80 GB H100 with 16 workers."""
    import torch

    if torch.cuda.is_initialized():
        from conformance import judge_memory

        judge_memory.release()  # its pool's unused memory too
        torch.cuda.empty_cache()


class InProcess:
    protected = False

    def describe(self, specs: list[str]) -> list[Described]:
        rows = []
        for spec in specs:
            try:
                backend = registry.load(spec)
            except registry.BackendNotFound as exc:
                rows.append(Described(spec, None, str(exc)))
                continue
            except Exception as exc:  # noqa: BLE001 - a broken third-party backend must not end a listing
                rows.append(Described(spec, None, f"failed to load: {type(exc).__name__}: {exc}"))
                continue
            rows.append(Described(spec, backend, unavailable=list(backend.unavailable_reasons())))
        return rows

    def run(self, check: str, backend: Backend, case: Case, device: str, options: RunOptions) -> CaseResult:
        return _judge(check, backend, case, device, options)

    def close(self) -> None:
        pass


class Isolated:
    protected = True

    def __init__(self, call_timeout: float | None = None):
        self.kernel = KernelProcess(call_timeout)

    def describe(self, specs: list[str]) -> list[Described]:
        """Each spec as the kernel's process describes it; a reply that is not a declaration of what was
        asked (missing, malformed, of the wrong types) is that backend's error, never trusted."""
        replies = self.kernel.describe(specs)
        rows = []
        for spec in specs:
            d = replies.get(spec) if isinstance(replies, dict) else None
            try:
                if isinstance(d, dict) and isinstance(d.get("error"), str):
                    rows.append(Described(spec, None, d["error"]))
                    continue
                unavailable = d["unavailable"]
                if not (isinstance(unavailable, list) and all(isinstance(u, str) for u in unavailable)):
                    raise TypeError("unavailable reasons are not a list of strings")
                rows.append(Described(spec, self.kernel.backend(spec, d), unavailable=unavailable))
            except (TypeError, KeyError, ValueError, AttributeError) as exc:
                rows.append(Described(spec, None, f"backend {spec!r}: its process sent no valid declaration "
                                                  f"({type(exc).__name__}: {exc})"))
        return rows

    def run(self, check: str, backend: Backend, case: Case, device: str, options: RunOptions) -> CaseResult:
        try:
            self.kernel.forget(release=options.gpu_shared_by > 1)
        except (KernelCrashed, KernelTimedOut):
            self.kernel.stop()
        return _judge(check, backend, case, device, options)

    def close(self) -> None:
        self.kernel.close()


def describe_known(runner) -> list[Described]:
    """Every known backend (built-in, registered, not import strings), described by ``runner``."""
    return runner.describe(registry.known_names())
