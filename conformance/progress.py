"""Where a run is, between pytest's dots: a line for each backend x check finished (its counts, how far
the run is, the time so far) and, on a terminal, the case running now after the dots, erased before
pytest writes the case's own letter. A run of minutes on a busy machine is never only dots."""

from __future__ import annotations

import time
from collections import Counter

import pytest

SAVE, RESTORE_AND_CLEAR = "\x1b7", "\x1b8\x1b[K"  # ANSI: save the cursor; restore it and clear to the line's end
ROOM_FOR_PERCENT = 8  # pytest's " [ 40%]" at the end of a line of dots
MIN_LIVE = 16  # a live text shorter than this says nothing: none is shown


def conformance_item(item) -> tuple[str, str, str] | None:
    """(backend, check, case or "fuzz") of a conformance test; None for any other test."""
    from conformance.plugin import CHECK_MARKER, FUZZ_MARKER

    params = getattr(getattr(item, "callspec", None), "params", {})
    backend = params.get("attn_backend")
    marker = item.get_closest_marker(CHECK_MARKER)
    if backend is None:
        return None
    if marker is not None and "attn_case" in params:
        return backend.name, marker.args[0], params["attn_case"].id
    if item.get_closest_marker(FUZZ_MARKER) is not None and "attn_fuzz_check" in params:
        return backend.name, params["attn_fuzz_check"], "fuzz"
    return None


def _fuzz_group(key: tuple[str, str, str]) -> tuple[str, str]:
    backend, check, case = key
    return backend, f"fuzz {check}" if case == "fuzz" else check


class Progress:
    """A pytest plugin (registered by plugin.py)."""

    def __init__(self, config, clock=time.monotonic):
        self.config, self.clock = config, clock
        self.items: dict[str, tuple[str, str, str]] = {}  # nodeid -> (backend, check, case)
        self.left: Counter = Counter()  # (backend, group) -> items not yet reported
        self.counts: dict = {}  # (backend, group) -> Counter of outcomes
        self.total = self.done = 0
        self.started = clock()
        self.finished: list = []  # groups whose last case was just reported
        self.live = False  # a live text is on the screen, to erase before pytest writes

    # -- where the lines go ----------------------------------------------------------------------
    @property
    def reporter(self):
        return self.config.pluginmanager.get_plugin("terminalreporter")

    def _terminal(self):
        """The terminal's file, when pytest writes to one with markup (a tty; not under --color=no)."""
        reporter = self.reporter
        tw = getattr(reporter, "_tw", None)
        file = getattr(tw, "_file", None)
        if reporter is None or file is None or not getattr(tw, "hasmarkup", False) or not reporter.isatty:
            return None
        return file

    # -- hooks ---------------------------------------------------------------------------------
    def pytest_collection_finish(self, session):
        for item in session.items:
            key = conformance_item(item)
            if key is not None:
                self.items[item.nodeid] = key
                self.left[_fuzz_group(key)] += 1
        self.total = len(self.items)
        self.started = self.clock()

    @pytest.hookimpl(trylast=True)  # after pytest wrote the test's name (-v)
    def pytest_runtest_logstart(self, nodeid, location):
        key = self.items.get(nodeid)
        file = self._terminal()
        if key is None or file is None:
            return
        backend, check, case = key
        text = f" {self.done + 1}/{self.total} {backend} {check} {case}"
        tw = self.reporter._tw
        room = tw.fullwidth - tw.width_of_current_line - ROOM_FOR_PERCENT
        if room < MIN_LIVE:
            return
        if len(text) > room:
            text = text[:room - 3] + "..."
        file.write(SAVE + text)
        file.flush()
        self.live = True

    def _erase(self) -> None:
        if self.live:
            file = self._terminal()
            if file is not None:
                file.write(RESTORE_AND_CLEAR)
                file.flush()
            self.live = False

    @pytest.hookimpl(tryfirst=True)  # erased before pytest writes the test's letter
    def pytest_runtest_logreport(self, report):
        self._erase()
        key = self.items.get(report.nodeid)
        if key is None or not (report.when == "call" or (report.when == "setup" and not report.passed)):
            return
        group = _fuzz_group(key)
        self.counts.setdefault(group, Counter())[report.outcome] += 1
        self.done += 1
        self.left[group] -= 1
        if self.left[group] == 0:
            self.finished.append(group)

    def pytest_runtest_logfinish(self, nodeid, location):
        """After pytest wrote the case's letter: the line of each backend x check that just finished."""
        reporter = self.reporter
        for group in self.finished if reporter is not None else ():
            reporter.ensure_newline()
            if reporter._tw.width_of_current_line:  # after the dots (-q), a line of its own
                reporter.write("\n")
            reporter.write_line(self.line(group))
        self.finished.clear()

    def line(self, group: tuple[str, str]) -> str:
        c = self.counts[group]
        counts = ", ".join(f"{c[o]} {o}" for o in ("passed", "failed", "skipped") if c[o]) or "no case"
        pct = 100 * self.done // max(self.total, 1)
        return (f"[{self.done}/{self.total} {pct}% {self.clock() - self.started:.0f} s] {group[0]} {group[1]}: "
                f"{counts}")
