"""The fuzz test's driver: one check on hypothesis-drawn cases within a backend's declaration, run
like any other case (the same runner, crash limit and failure text); strategies live in fuzz.py.

Profiles. ``fuzz.PROFILES`` are registered with hypothesis as ``conformance-NAME`` (``register_profiles``),
so ``--hypothesis-profile=conformance-dev`` selects one as well as ``--fuzz=dev`` does (the hypothesis
option wins when it names one of ours); a project's own profiles are left alone and do not change ours.

Draws. ``ci`` draws the same examples every run (derandomized). Hypothesis derives a derandomized
test's seed from the test function's source, which here is this module's: an edit of the driver would
change every run's draws, and with them which compiled variants a warm cache already holds. So a
derandomized profile runs with a seed of the check's name (``draw_seed``) instead, which hypothesis
takes over ``derandomize``: the draws depend on the check, the declaration and hypothesis' version.

Replay. Hypothesis turns its example database off for a derandomized test (a fixed seed does too).
So the replay is our own and the same in every profile: the minimal failing case of each backend ×
check is saved by its id (a case id is a complete serialisation of the case) in
``.hypothesis/conformance/<backend>--<check>.txt`` (under ``$HYPOTHESIS_STORAGE_DIRECTORY`` when set;
an import string's backend name becomes its readable part and a digest), replayed first on the next
run as an explicit example, and dropped once it passes. Hypothesis' own database is not used.

Shrinking. After the first failure, hypothesis runs ever smaller cases until none fails (for up to
five minutes). Where each new case compiles a kernel that was most of a run: on an H100, compiled flex's
standard-tier fuzz tests each shrank for hypothesis' full five minutes, one compilation after another
(3 to over 60 s each, and minutes for one whose compilation never ends). So new cases
are run for at most ``SHRINK_SECONDS`` after the first failure; past that hypothesis' further
candidates are rejected unrun, and the smallest failing case found by then is the one reported. A
kernel that answers in milliseconds still shrinks to the end.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from pathlib import Path

import hypothesis
import pytest
from hypothesis import HealthCheck, settings

from conformance import fuzz
from conformance.case import Case
from conformance.checks import CHECKS
from conformance.outcomes import Outcome

PREFIX = "conformance-"
SHRINK_SECONDS = 60  # after the first failure, new cases are run for this long at most (Shrinking, above)


class NotFuzzable(Exception):
    """No case of this check can be drawn for this backend; the reasons are the message."""


def register_profiles() -> None:
    """Register ``fuzz.PROFILES`` with hypothesis as conformance-NAME (idempotent; done on import). It
    must happen before hypothesis' pytest plugin loads ``--hypothesis-profile`` (its pytest_configure).
    Each is built on hypothesis' defaults, not on whatever profile a project loaded."""
    for name, values in fuzz.PROFILES.items():
        # A narrow declaration legitimately filters out many draws; the rerun line replaces the blob.
        settings.register_profile(PREFIX + name, parent=settings.get_profile("default"), deadline=None,
                                  print_blob=False, database=None,
                                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
                                  **values)


def profile_name(fuzz_option: str) -> str:
    """The profile the fuzz test runs: one of ours loaded with --hypothesis-profile, else --fuzz's."""
    current = getattr(settings, "get_current_profile_name", lambda: getattr(settings, "_current_profile", ""))()
    return current if current.startswith(PREFIX) and current[len(PREFIX):] in fuzz.PROFILES else PREFIX + fuzz_option


def replay_dir() -> Path:
    return Path(os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY") or ".hypothesis") / "conformance"


def replay_file(backend: str, check: str, folder: Path | None = None) -> Path:
    """One file per backend × check: its own key."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", backend)
    if safe != backend:  # an import string: its readable part and a digest of the whole
        safe += "-" + hashlib.sha1(backend.encode()).hexdigest()[:8]
    return (folder or replay_dir()) / f"{safe}--{check}.txt"


def saved_cases(file: Path) -> list[Case]:
    cases = []
    if file.exists():
        for line in file.read_text(encoding="utf-8").split():
            try:
                cases.append(Case.from_id(line))
            except (ValueError, TypeError, KeyError):  # a case id of another version of this package
                continue
    return cases


def _write(file: Path, cases: list[Case]) -> None:
    if not cases:
        file.unlink(missing_ok=True)
        return
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text("".join(f"{c.id}\n" for c in dict.fromkeys(cases)), encoding="utf-8")


def _assertion_texts(exc: BaseException) -> list[str] | None:
    """The messages of a failure hypothesis raised: one AssertionError, or a group of them (several
    distinct failures); None for anything else (a harness error keeps its traceback)."""
    if isinstance(exc, AssertionError):
        return [str(exc)]
    group = getattr(exc, "exceptions", None)
    if group:
        texts = [_assertion_texts(e) for e in group]
        if all(t is not None for t in texts):
            return [text for t in texts for text in t]
    return None


def draw_seed(check: str) -> int:
    """The seed of a derandomized profile's draws (Draws, above): the check's name, digested."""
    return int.from_bytes(hashlib.sha256(check.encode()).digest()[:8], "big")


def fuzz_check(session, backend, check: str, learnt: dict, replay_folder: Path | None = None) -> None:
    """Fails the test (pytest.fail, no traceback through this suite) with the minimal failing case's
    text: the kernel's finding and the rerun line; hypothesis shrinks to it. The last failure is left in
    ``learnt`` for the journal. Cases the backend refuses at run time are rejected."""
    declared = CHECKS[check]
    reasons = fuzz.not_fuzzable_reasons(backend.capabilities, declared.needs, declared.feature)
    if reasons:
        raise NotFuzzable("; ".join(reasons))
    device = session.selection.device
    variants = (fuzz.grid_variants(declared, backend.capabilities, device, session.selection.tier)
                if backend.compiled else ())
    if backend.compiled and not variants:  # drawn freely, every case would be a compilation of its own
        raise NotFuzzable("compiled, and the check's grid realises no variant at this tier to draw from")
    strategy = fuzz.cases(backend.capabilities, device, declared.needs, declared.feature, variants=variants)
    name = profile_name(session.fuzz_profile)
    file = replay_file(backend.name, check, replay_folder)
    saved = saved_cases(file)
    failing: list[Case] = []
    # Distinct draws may map to one case (hypothesis tells draws apart, not cases): each case is judged
    # once per fuzz test, and a repeat, or hypothesis' replay of the failing one, gets its result.
    judged: dict[str, object] = {}
    first_failure_at = None  # time.monotonic() of the first failure: shrinking's time runs from it

    def example(case):
        nonlocal first_failure_at
        result = judged.get(case.id)  # before the crash limit: hypothesis replays a crash it found
        if result is None:
            shrinking_done = first_failure_at is not None and time.monotonic() - first_failure_at >= SHRINK_SECONDS
            if shrinking_done or session.given_up_on(backend, case):
                hypothesis.reject()
            result = judged[case.id] = session.run(check, backend, case)
        hypothesis.assume(result.outcome not in (Outcome.SKIPPED, Outcome.OOM))
        failure = session.failure_text(check, backend, case, result)
        if failure:  # the last failure reported is the minimal one hypothesis replays
            learnt.clear()
            learnt.update(case=case, outcome=result.outcome, result=result)
            failing.append(case)
            if first_failure_at is None:
                first_failure_at = time.monotonic()
            raise AssertionError(failure)

    test = hypothesis.given(case=strategy)(example)
    for case in reversed(saved):  # explicit examples run first, before any draw
        test = hypothesis.example(case=case)(test)
    profile = settings.get_profile(name)
    if profile.derandomize:
        test = hypothesis.seed(draw_seed(check))(test)
    test = settings(profile)(test)
    try:
        test()
    except Exception as exc:  # noqa: BLE001 - sorted below: a kernel's failure, or the harness's
        texts = _assertion_texts(exc)
        if texts is None:
            raise
    else:
        _write(file, [])  # every saved case passes now
        return
    replayed = [c for c in saved if c in failing]
    _write(file, ([learnt["case"]] if learnt.get("case") is not None else []) + replayed)
    note = f"fuzz profile {name}" + (f"; {len(replayed)} case(s) saved by an earlier run failed again" if saved else "")
    # outside the except clause: the kernel's finding alone, no traceback or chained exception of this suite
    pytest.fail("\n".join(dict.fromkeys(texts)) + f"\n  ({note}) replayed first next run from {file}", pytrace=False)


register_profiles()
