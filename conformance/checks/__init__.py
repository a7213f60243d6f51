"""The checks, by name. Each module holds NAME, NEEDS (backend features it requires beyond the case),
``cases(tier)`` (its grid) and ``run(backend, case, device) -> Verdict``."""

from __future__ import annotations

import traceback

from conformance.backend import Backend, ContractError, Unsupported
from conformance.case import Case
from conformance.checks import causal, forward, gradients, sanity
from conformance.verdict import Verdict

CHECKS = {module.NAME: module for module in (forward, gradients, causal, sanity)}


def execute(check: str, backend: Backend, case: Case, device: str) -> Verdict:
    """Run one check. An exception from the backend is a failure of the check (the case is inside the
    backend's declaration); ``Unsupported`` propagates, to become a skip with the library's reason."""
    try:
        return CHECKS[check].run(backend, case, device)
    except Unsupported:
        raise
    except ContractError as exc:
        prop, message = "contract", str(exc)
    except Exception as exc:  # noqa: BLE001 - any error of a backend inside its declaration is a failure
        where = traceback.extract_tb(exc.__traceback__)[-1]
        prop, message = "raised", f"{type(exc).__name__} at {where.filename}:{where.lineno}: {exc}"
    verdict = Verdict(check, backend.name, case, device)
    verdict.fail(prop, message)
    return verdict
