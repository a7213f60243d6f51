"""The checks, by name. Each module holds NAME, NEEDS (backend features it requires beyond the case),
CASE_FEATURE (the case feature it exercises, which all its cases have, or None),
``cases(tier)`` (its grid) and ``run(backend, case, device[, options]) -> Verdict``; optionally
``skip_reason(backend, case, device, options)`` for what decides at collection time that a case is not
measured here."""

from __future__ import annotations

import traceback

from conformance.backend import Backend, ContractError, Unsupported, classify
from conformance.case import Case
import inspect

from conformance.checks import (alibi, causal, determinism, forward, gradients, kvcache, memory, sanity, softcap, speed,
                                varlen, window)
from conformance.verdict import Verdict

CHECKS = {module.NAME: module for module in (forward, gradients, causal, sanity, window, softcap, alibi, varlen,
                                             kvcache, determinism, memory, speed)}
# Checks that measure rather than compare take the run's options (tier, baselines, memory budget).
TAKES_OPTIONS = {name for name, module in CHECKS.items() if "options" in inspect.signature(module.run).parameters}
CORRECTNESS_CHECKS = [name for name in CHECKS if name not in TAKES_OPTIONS]  # not measuring: these are fuzzed


def execute(check: str, backend: Backend, case: Case, device: str, options: dict | None = None) -> Verdict:
    """Run one check. An exception from the backend is a failure of the check (the case is inside the
    backend's declaration), except: ``Unsupported`` propagates, to become a skip with the library's
    reason; out-of-memory and context-poisoning device errors propagate as ``OutOfMemory`` and
    ``DeviceFault``, results of their own."""
    try:
        if check in TAKES_OPTIONS:
            return CHECKS[check].run(backend, case, device, options=options or {})
        return CHECKS[check].run(backend, case, device)
    except Unsupported:
        raise
    except ContractError as exc:
        prop, message = "contract", str(exc)
    except Exception as exc:  # noqa: BLE001 - any error of a backend inside its declaration is a failure
        kind = classify(exc)
        if kind is not None:
            raise kind(f"{type(exc).__name__}: {exc}") from exc
        where = traceback.extract_tb(exc.__traceback__)[-1]
        prop, message = "raised", f"{type(exc).__name__} at {where.filename}:{where.lineno}: {exc}"
    verdict = Verdict(check, backend.name, case, device)
    verdict.fail(prop, message)
    return verdict
