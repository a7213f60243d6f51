"""What one run tests: the device, the tier, the backends, the checks and (optionally) exact cases.

Built from command-line options; every invalid value is a ``SelectionError`` naming what is wrong,
which the plugin turns into pytest's usage error.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from conformance import isolation, registry, tiers
from conformance.backend import Backend
from conformance.case import Case
from conformance.checks import CHECKS


class SelectionError(Exception):
    pass


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _split(values: list[str]) -> list[str]:
    """Repeatable options that also accept comma-separated lists."""
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


@dataclass
class Selection:
    device: str
    tier: str
    backend_specs: list[str]  # empty: every backend available here
    checks: list[str]
    case_ids: list[str] = field(default_factory=list)
    # --backend values to their declarations: isolation.Isolated.describe (from the kernel's process) or
    # InProcess.describe
    describe: Callable[[list[str]], list[isolation.Described]] = field(default=isolation.InProcess().describe,
                                                                       repr=False)
    _backends: list[Backend] | None = None
    # the options whose short form (--device) is ours in this run; the others are --attn-NAME in rerun lines
    short_names: tuple[str, ...] = ("backend", "device", "check", "case")

    @classmethod
    def from_options(cls, backend: list[str], device: str | None, tier: str, check: list[str],
                     case: list[str], describe: Callable | None = None,
                     short_names: tuple[str, ...] = ("backend", "device", "check", "case")) -> Selection:
        device = device or default_device()
        if device == "cuda" and not torch.cuda.is_available():
            raise SelectionError(f"--device cuda, but torch {torch.__version__} sees no CUDA device")
        if tier not in tiers.TIERS:
            raise SelectionError(f"unknown tier {tier!r}; choose one of {', '.join(tiers.TIERS)}")
        known = [*CHECKS, "fuzz"]
        checks = _split(check) or known
        unknown = [c for c in checks if c not in known]
        if unknown:
            raise SelectionError(f"unknown check(s) {', '.join(unknown)}; known checks: {', '.join(known)}")
        case_ids = _split(case)
        for case_id in case_ids:
            try:
                Case.from_id(case_id)
            except ValueError as exc:
                raise SelectionError(f"--case: {exc}") from None
        if any(not value.strip(" ,") for value in backend):
            raise SelectionError("--backend is empty; name a backend (see --list-backends) or leave the option out")
        selection = cls(device, tier, _split(backend), checks, case_ids, describe or isolation.InProcess().describe,
                        short_names=short_names)
        if selection.backend_specs:
            selection.backends()  # resolve now, so a bad name is a usage error before collection
        return selection

    def backends(self) -> list[Backend]:
        """The backends to test. Named ones must load and be usable here; by default every backend
        that is available on this machine and declares this device."""
        if self._backends is None:
            if self.backend_specs:
                self._backends = []
                for row in self.describe(self.backend_specs):
                    if row.backend is None:
                        raise SelectionError(row.error)
                    if row.unavailable:
                        raise SelectionError(f"backend {row.spec!r} is unavailable here: {'; '.join(row.unavailable)}")
                    self._backends.append(row.backend)
            else:
                self._backends = [row.backend for row in self.describe(registry.known_names())
                                  if row.backend is not None and not row.unavailable
                                  and self.device in row.backend.capabilities.devices]
        return self._backends

    def cases(self, check: str) -> list[Case]:
        if self.case_ids:
            return [Case.from_id(case_id) for case_id in self.case_ids]
        return CHECKS[check].cases(self.tier)

    def rerun_command(self, check: str, backend: Backend, case: Case) -> str:
        """One line that reruns exactly this check, backend and case, from any directory."""
        return ("pytest --pyargs conformance.suite " + " ".join(
            shlex.quote(f"--{k if k in self.short_names else 'attn-' + k}={v}") for k, v in
            (("backend", backend.name), ("device", self.device), ("check", check), ("case", case.id))))
