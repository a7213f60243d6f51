"""What a case can end in: one enum, used by the runner, the plugin, the journal and the summary."""

from __future__ import annotations

from enum import Enum


class Outcome(str, Enum):
    PASSED = "passed"
    FAILED = "failed"
    SKIPPED = "skipped"  # outside the declaration, or refused by the library at run time
    CRASHED = "crashed"  # the kernel's process died, or poisoned its CUDA context
    TIMED_OUT = "timed out"  # a call into the kernel did not return within --case-timeout
    OOM = "oom"  # out of memory: a result of its own, never a pass
    NOT_RUN = "not run"  # the backend was given up on (--crash-limit)
    HARNESS_ERROR = "harness error"  # the suite's own code failed: not the backend's fault

    def __str__(self) -> str:
        return self.value

    @property
    def in_pytest_terms(self) -> str:
        """passed, failed or skipped: how the case counts in pytest's summary and in the verdict cells."""
        if self in (Outcome.CRASHED, Outcome.TIMED_OUT, Outcome.HARNESS_ERROR):
            return "failed"
        if self in (Outcome.OOM, Outcome.NOT_RUN):
            return "skipped"
        return self.value

    @property
    def is_problem(self) -> bool:
        """Named in the summary's own column, beside the counts."""
        return self not in (Outcome.PASSED, Outcome.FAILED, Outcome.SKIPPED)

    @property
    def hard_failure(self) -> bool:
        """Counts toward --crash-limit."""
        return self in (Outcome.CRASHED, Outcome.TIMED_OUT)
