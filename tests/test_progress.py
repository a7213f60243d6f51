"""The progress lines: one per backend x check finished, with counts and how far the run is; on a
terminal, the case running now after the dots, erased before pytest writes the case's letter."""

import io
from types import SimpleNamespace

from conformance import progress

CASES = "b2_q17_k17_h4_d32_fp32_seed1,b1_q33_k33_h4_d32_fp32_seed2"


def test_a_line_per_backend_and_check_finished(pytester):
    result = pytester.runpytest("--pyargs", "conformance.suite", "-q", "-p", "no:cacheprovider", "--results-file=",
                                "--backend=naive,tiled", "--check=forward,sanity", f"--case={CASES}")
    lines = [line for line in result.outlines if line.startswith("[")]
    assert [line.split("] ", 1)[1] for line in lines] == [
        "naive forward: 2 passed", "tiled forward: 2 passed", "naive sanity: 2 passed", "tiled sanity: 2 passed"]
    assert lines[1].startswith("[4/8 50% ") and lines[-1].startswith("[8/8 100% ")


class _Writer:
    def __init__(self, tty: bool, used: int = 10):
        self._file, self.hasmarkup, self.fullwidth, self.width_of_current_line = io.StringIO(), tty, 80, used


def _progress(tty: bool, used: int = 10):
    reporter = SimpleNamespace(_tw=_Writer(tty, used), isatty=tty, verbosity=0)
    config = SimpleNamespace(pluginmanager=SimpleNamespace(get_plugin=lambda name: reporter))
    p = progress.Progress(config)
    p.items, p.total = {"t1": ("naive", "forward", "b1_q17_k17_h4_d32_fp32_seed1")}, 1
    return p, reporter._tw._file


def test_on_a_terminal_the_running_case_is_shown_then_erased():
    p, out = _progress(tty=True)
    p.pytest_runtest_logstart("t1", None)
    assert out.getvalue() == progress.SAVE + " 1/1 naive forward b1_q17_k17_h4_d32_fp32_seed1"
    p.pytest_runtest_logreport(SimpleNamespace(nodeid="t1", when="setup", passed=True, outcome="passed"))
    assert out.getvalue().endswith(progress.RESTORE_AND_CLEAR)
    p.pytest_runtest_logstart("other", None)  # not a conformance test
    p.pytest_runtest_logreport(SimpleNamespace(nodeid="other", when="call", passed=True, outcome="passed"))
    assert out.getvalue().count(progress.SAVE) == 1 and out.getvalue().count(progress.RESTORE_AND_CLEAR) == 1


def test_no_live_text_off_a_terminal_or_without_room():
    for p, out in (_progress(tty=False), _progress(tty=True, used=70)):
        p.pytest_runtest_logstart("t1", None)
        p.pytest_runtest_logreport(SimpleNamespace(nodeid="t1", when="call", passed=True, outcome="passed"))
        assert out.getvalue() == ""
    p, out = _progress(tty=True, used=40)  # room for a shortened text only
    p.pytest_runtest_logstart("t1", None)
    assert out.getvalue().endswith("...") and len(out.getvalue()) - len(progress.SAVE) == 80 - 40 - 8
