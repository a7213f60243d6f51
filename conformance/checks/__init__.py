"""The checks: one declared ``Check`` per module (its ``CHECK``), listed once in ``CHECKS``.

``execute`` runs one check in the judge's process and sorts what can go wrong: the backend's own
errors become findings (``raised``, ``contract``) or outcomes of their own (unsupported, oom,
crashed, timed out, raised as the exceptions of backend.py and kernel_client.py), while an error of
the suite's own code is a ``HarnessError``, never blamed on the backend.
"""

from __future__ import annotations

import traceback
from pathlib import Path

import torch

from conformance import expected
from conformance.backend import (Backend, ContractError, DeviceFault, KernelCrashed, KernelRaised, KernelTimedOut,
                                 OutOfMemory, Unsupported, classify)
from conformance.case import Case
from conformance.checks import (alibi, attn_bias, causal, determinism, dropout, forward, gradients, kvcache, memory, sanity, softcap,
                                speed, varlen, window)
from conformance.checks.check import Check
from conformance.options import RunOptions
from conformance.verdict import Verdict

CHECKS: dict[str, Check] = {m.CHECK.name: m.CHECK for m in (forward, gradients, causal, sanity, window, softcap, alibi,
                                                            varlen, kvcache, attn_bias, dropout, determinism, memory,
                                                            speed)}
CORRECTNESS_CHECKS = [name for name, check in CHECKS.items() if not check.measures]  # these are fuzzed
_SUITE = Path(__file__).resolve().parents[1]  # the conformance package
_BACKENDS = _SUITE / "backends"
_TORCH = Path(torch.__file__).resolve().parent


class HarnessError(Exception):
    """The suite's own code failed on a case (a bug here, not in the backend)."""


def execute(check: str, backend: Backend, case: Case, device: str, options: RunOptions | None = None) -> Verdict:
    """Run one check. A backend's error inside its declaration is a failure of the check; these
    propagate, as results of their own: ``Unsupported`` (a skip with the library's reason),
    ``OutOfMemory``, ``DeviceFault`` and ``KernelCrashed`` (crashed), ``KernelTimedOut``. Anything
    else raised by the suite's own code is a ``HarnessError``."""
    declared = CHECKS[check]
    try:
        verdict = _execute(declared, backend, case, device, options)
    except Exception:
        expected.settle()  # not on an interrupt: a reference being computed is not waited for then
        raise
    expected.settle()
    return verdict


def _execute(declared: Check, backend: Backend, case: Case, device: str, options: RunOptions | None) -> Verdict:
    check = declared.name
    try:
        if declared.reference is not None:  # what the check compares with, computed while the kernel runs
            caps = backend.capabilities
            expected.soon(case, device, caps.masked_rows, declared.reference == "gradients" and caps.backward,
                          caps.accumulation)
        if declared.measures:
            return declared.run(backend, case, device, options=options or RunOptions())
        return declared.run(backend, case, device)
    except (Unsupported, OutOfMemory, DeviceFault, KernelCrashed, KernelTimedOut):
        raise
    except ContractError as exc:
        prop, message = "contract", str(exc)
    except KernelRaised as exc:
        prop, message = "raised", str(exc)
    except Exception as exc:  # noqa: BLE001 - sorted below: the backend's, or ours
        kind = classify(exc)
        where = _culprit(traceback.extract_tb(exc.__traceback__))
        if kind is not None:
            # the judge's own reference on the device can run out too (a GPU shared by pytest-xdist workers)
            judge = "in the judge's own computation, " if kind is OutOfMemory and _ours(where.filename) else ""
            raise kind(f"{judge}{type(exc).__name__}: {exc}") from exc
        text = f"{type(exc).__name__} at {where.filename}:{where.lineno}: {exc}"
        if _ours(where.filename):
            raise HarnessError(text) from exc
        prop, message = "raised", text  # a backend running in this process raised (--isolation=none, self-tests)
    verdict = Verdict(check, backend.name, case, device)
    verdict.fail(prop, message)
    return verdict


def _culprit(frames: traceback.StackSummary) -> traceback.FrameSummary:
    """The innermost frame outside torch: the code that made the failing call."""
    outside = [f for f in frames if not Path(f.filename).resolve().is_relative_to(_TORCH)]
    return (outside or frames)[-1]


def _ours(filename: str) -> bool:
    """Code of the suite itself (its adapters in backends/ wrap a library: their errors are the backend's)."""
    path = Path(filename).resolve()
    return path.is_relative_to(_SUITE) and not path.is_relative_to(_BACKENDS)
