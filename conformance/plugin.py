"""The pytest plugin (entry point ``pytest11: attention_conformance``): options, parametrization,
report header, journal records and the verdict table. Wiring only; the work lives in the modules it
calls."""

from __future__ import annotations

import dataclasses

import pytest

from conformance import summary, tiers
from conformance.backend import Unsupported
from conformance.checks import CHECKS, execute
from conformance.results import Recorder
from conformance.selection import Selection, SelectionError, availability
from conformance.verdict import Verdict

SELECTION = pytest.StashKey[Selection]()
RECORDER = pytest.StashKey[Recorder]()
VERDICT = pytest.StashKey[Verdict]()
SKIP_REASONS = pytest.StashKey[list]()
MARKER = "attention_check"


def pytest_addoption(parser):
    group = parser.getgroup("attention-conformance", "attention kernel conformance")
    group.addoption("--backend", action="append", default=[], metavar="NAME",
                    help="backend to test: a registered name, path/to/file.py:function or package.module:function; "
                         "repeatable or comma-separated (default: every backend available here)")
    group.addoption("--device", choices=("cpu", "cuda"), default=None,
                    help="device to test on (default: cuda when available, else cpu)")
    group.addoption("--tier", choices=tiers.TIERS, default=tiers.DEFAULT_TIER,
                    help=f"size of the case grid (default: {tiers.DEFAULT_TIER})")
    group.addoption("--check", action="append", default=[], metavar="NAME",
                    help=f"run only these checks ({', '.join(CHECKS)}); repeatable or comma-separated")
    group.addoption("--case", action="append", default=[], metavar="CASE_ID",
                    help="run exactly these case ids (as printed with a failure) instead of the tier's grid")
    group.addoption("--list-backends", action="store_true",
                    help="list every known backend, whether it is available here and why not, then exit")
    group.addoption("--results-file", default="conformance-results.jsonl", metavar="PATH",
                    help="JSON-lines journal of this run's cases, rewritten each run ('' to disable)")


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    if config.getoption("list_backends"):
        for line in backend_listing():
            print(line)
        return 0
    return None


def backend_listing() -> list[str]:
    lines = []
    for backend, reasons in availability():
        name = backend if isinstance(backend, str) else backend.name
        state = "available" if not reasons else "unavailable: " + "; ".join(reasons)
        lines.append(f"{name:<12} {state}")
        if not isinstance(backend, str):
            if backend.description:
                lines.append(f"{'':<12} {backend.description}")
            lines.append(f"{'':<12} {backend.capabilities.summary()}")
    return lines


def pytest_configure(config):
    config.addinivalue_line("markers", f"{MARKER}(name): a conformance test of the named check")
    try:
        selection = Selection.from_options(config.getoption("backend"), config.getoption("device"),
                                           config.getoption("tier"), config.getoption("check"),
                                           config.getoption("case"))
    except SelectionError as exc:
        raise pytest.UsageError(str(exc)) from None
    config.stash[SELECTION] = selection
    config.stash[RECORDER] = Recorder(config.getoption("results_file"),
                                      {"device": selection.device, "tier": selection.tier})


def pytest_unconfigure(config):
    if RECORDER in config.stash:
        config.stash[RECORDER].close()


def pytest_report_header(config):
    s = config.stash[SELECTION]
    named = ", ".join(s.backend_specs) or "every backend available here (see --list-backends)"
    return f"attention-conformance: device {s.device}, tier {s.tier}, backends: {named}"


def pytest_generate_tests(metafunc):
    marker = metafunc.definition.get_closest_marker(MARKER)
    if marker is None:
        return
    selection = metafunc.config.stash[SELECTION]
    check = CHECKS[marker.args[0]]
    params = []
    for case in selection.cases(check.NAME):  # case-major, so backends share each case's reference
        for backend in selection.backends():
            reasons = backend.capabilities.not_supported_reasons(case, selection.device, check.NEEDS)
            marks = [pytest.mark.skip(reason=f"{backend.name}: {'; '.join(reasons)}")] if reasons else []
            params.append(pytest.param(backend, case, marks=marks, id=f"{backend.name}-{case.id}"))
    metafunc.parametrize(("attn_backend", "attn_case"), params)


def pytest_collection_modifyitems(config, items):
    selected = config.stash[SELECTION].checks
    keep, drop = [], []
    for item in items:
        marker = item.get_closest_marker(MARKER)
        (drop if marker is not None and marker.args[0] not in selected else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture
def attn_check(request):
    """Runs this test's check on a backend and case; fails with the findings and a rerun line."""
    selection = request.config.stash[SELECTION]
    check = request.node.get_closest_marker(MARKER).args[0]

    def run(backend, case):
        try:
            verdict = execute(check, backend, case, selection.device)
        except Unsupported as exc:
            request.node.stash[SKIP_REASONS] = [str(exc)]
            pytest.skip(f"{backend.name}: {exc}")
        request.node.stash[VERDICT] = verdict
        if not verdict.passed:
            pytest.fail(f"{verdict.message()}\n  rerun: {selection.rerun_command(check, backend, case)}",
                        pytrace=False)

    return run


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    marker = item.get_closest_marker(MARKER)
    final = call.when == "call" or (call.when == "setup" and not report.passed)
    if marker is None or not final or not hasattr(item, "callspec"):
        return report
    item.config.stash[RECORDER].add(_record(item, marker.args[0], report))
    return report


def _record(item, check: str, report) -> dict:
    selection = item.config.stash[SELECTION]
    backend, case = item.callspec.params["attn_backend"], item.callspec.params["attn_case"]
    record = {"record": "case", "nodeid": item.nodeid, "backend": backend.name, "check": check,
              "case_id": case.id, "case": dataclasses.asdict(case), "device": selection.device,
              "tier": selection.tier, "outcome": report.outcome, "duration_s": round(report.duration, 6),
              "rerun": selection.rerun_command(check, backend, case)}
    if report.skipped:
        reasons = item.stash.get(SKIP_REASONS, None) or backend.capabilities.not_supported_reasons(
            case, selection.device, CHECKS[check].NEEDS)
        record["reasons"] = reasons
    verdict = item.stash.get(VERDICT, None)
    if verdict is not None:
        record.update(verdict.as_dict())
    elif report.failed:
        record["findings"] = [{"property": "harness", "message": str(report.longrepr)[-2000:]}]
    return record


def pytest_terminal_summary(terminalreporter, config):
    recorder = config.stash.get(RECORDER, None)
    if recorder is None or not recorder.records:
        return
    terminalreporter.write_sep("=", "attention conformance")
    for line in summary.table(recorder.records):
        terminalreporter.write_line(line)
    if recorder.path:
        terminalreporter.write_line(f"results journal: {recorder.path}")
