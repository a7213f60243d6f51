"""The fuzz test's driver: one check on hypothesis-drawn cases within a backend's declaration, run
like any other case (the same runner, crash limit and failure text); strategies live in fuzz.py."""

from __future__ import annotations

import hypothesis

from conformance import fuzz
from conformance.checks import CHECKS
from conformance.outcomes import Outcome


class NotFuzzable(Exception):
    """No case of this check can be drawn for this backend; the reasons are the message."""


def fuzz_check(session, backend, check: str, learnt: dict) -> None:
    """Raises AssertionError with the minimal failing case's text (hypothesis shrinks to it); the last
    failure is left in ``learnt`` for the journal. Cases the backend refuses at run time are rejected."""
    declared = CHECKS[check]
    reasons = fuzz.not_fuzzable_reasons(backend.capabilities, declared.needs, declared.feature)
    if reasons:
        raise NotFuzzable("; ".join(reasons))
    strategy = fuzz.cases(backend.capabilities, session.selection.device, declared.needs, declared.feature)

    @fuzz.profile(session.fuzz_profile)
    @hypothesis.given(case=strategy)
    def example(case):
        if session.given_up_on(backend):
            hypothesis.reject()
        result = session.run(check, backend, case)
        hypothesis.assume(result.outcome not in (Outcome.SKIPPED, Outcome.OOM))
        failure = session.failure_text(check, backend, case, result)
        if failure:  # the last failure reported is the minimal one hypothesis replays
            learnt.clear()
            learnt.update(case=case, outcome=result.outcome, result=result)
            raise AssertionError(failure)

    example()
