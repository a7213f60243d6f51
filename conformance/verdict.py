"""The outcome of one check on one backend and case: what failed and the numbers behind it."""

from __future__ import annotations

from dataclasses import dataclass, field

from conformance.case import Case
from conformance.tolerance import Comparison


MESSAGE_LINES = 12  # of one finding in a failure's text: a compiler's error can run to a hundred


@dataclass(frozen=True)
class Finding:
    """One failed property, e.g. ("forward", "out: max abs error ... EXCEEDS bound ...")."""

    property: str
    message: str
    diagnosis: str | None = None  # the cause it fits, when one does (diagnosis.py), for grouping


@dataclass
class Verdict:
    check: str
    backend: str
    case: Case
    device: str
    findings: list[Finding] = field(default_factory=list)
    comparisons: list[Comparison] = field(default_factory=list)
    measurements: dict = field(default_factory=dict)  # properties reported, not judged (e.g. run-to-run spread)

    @property
    def passed(self) -> bool:
        return not self.findings

    def fail(self, prop: str, message: str, diagnosis: str | None = None) -> None:
        self.findings.append(Finding(prop, message, diagnosis))

    def add(self, prop: str, comparison: Comparison) -> None:
        """Record a tolerance comparison; a failing one is also a finding of ``prop``."""
        self.comparisons.append(comparison)
        if not comparison.passed:
            self.fail(prop, comparison.describe(), getattr(comparison, "diagnosis", None))

    @property
    def failed_properties(self) -> set[str]:
        return {f.property for f in self.findings}

    def message(self) -> str:
        """What the terminal shows: each finding's first MESSAGE_LINES lines; the journal's record of the
        case (``as_dict``) keeps every line."""
        head = f"{self.check} check failed for backend {self.backend!r} on case {self.case.id} ({self.device})"
        return "\n".join([head, *(f"  [{f.property}] {_shown(f.message)}" for f in self.findings)])

    def as_dict(self) -> dict:
        return {"findings": [{"property": f.property, "message": f.message,
                              **({"diagnosis": f.diagnosis} if f.diagnosis else {})} for f in self.findings],
                "comparisons": [c.as_dict() for c in self.comparisons], "measurements": self.measurements}

    @classmethod
    def from_dict(cls, check: str, backend: str, case: Case, device: str, data: dict) -> Verdict:
        """The inverse of ``as_dict`` (a verdict that crossed a process boundary)."""
        return cls(check, backend, case, device, [Finding(**f) for f in data["findings"]],
                   [Comparison(**c) for c in data["comparisons"]], data.get("measurements", {}))


def _shown(message: str) -> str:
    lines = message.splitlines()
    if len(lines) <= MESSAGE_LINES:
        return message
    return "\n".join([*lines[:MESSAGE_LINES], f"  ... {len(lines) - MESSAGE_LINES} more lines in the results journal's "
                                              f"record of this case, if kept (--results-file)"])
