"""The pytest plugin (entry point ``pytest11: attention_conformance``): options and hooks only. The
run's state and policy live on a ``ConformanceSession`` (session.py), registered as a plugin of its own
when pytest is configured; the fuzz driver, the listing, the journal and the summary have modules of
their own."""

from __future__ import annotations

import argparse

import pytest

from conformance import fuzz, grid, summary, tiers, workers
from conformance.checks import CHECKS, CORRECTNESS_CHECKS
from conformance.fuzz_driver import NotFuzzable, fuzz_check
from conformance.outcomes import Outcome
from conformance.results import ResultsFileError
from conformance.selection import SelectionError
from conformance.session import ConformanceSession, positive_number

CHECK_MARKER, FUZZ_MARKER = "attention_check", "attention_fuzz"
SESSION = pytest.StashKey[ConformanceSession]()
LEARNT = pytest.StashKey[dict]()  # what a test learnt, for its journal record


def _option_type(kind):
    parse = positive_number(kind)

    def checked(text):
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return checked


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
                    help=f"run only these checks ({', '.join(CHECKS)}, fuzz); repeatable or comma-separated")
    group.addoption("--case", action="append", default=[], metavar="CASE_ID",
                    help="run exactly these case ids (as printed with a failure) instead of the tier's grid")
    group.addoption("--list-backends", action="store_true",
                    help="list every known backend, whether it is available here and why not, then exit")
    group.addoption("--results-file", default="conformance-results.jsonl", metavar="PATH",
                    help="JSON-lines journal of this run's cases, replaced each run ('' to disable)")
    group.addoption("--isolation", choices=("process", "none"), default="process",
                    help="run the kernel in a process of its own, apart from the judge, replaced when it crashes "
                         "or hangs (default); or in the pytest process, for debugging (verdicts then unprotected)")
    group.addoption("--case-timeout", type=_option_type(float), default=None, metavar="SECONDS",
                    help="a call into the kernel running longer has timed out: a hang detector (default by tier: "
                         + ", ".join(f"{t.name} {t.case_timeout_s:g}" for t in tiers.all_tiers())
                         + "; needs --isolation=process)")
    group.addoption("--crash-limit", type=_option_type(int), default=3, metavar="N",
                    help="after N crashed or timed-out cases in a row, a backend's remaining cases are not run "
                         "(default 3)")
    group.addoption("--update-baselines", action="store_true",
                    help="measure the speed cases and write them into the baselines of this GPU architecture")
    group.addoption("--speed-against", default=None, metavar="BACKEND",
                    help="speed check: compare with this backend (a registered name or an import string, e.g. the "
                         "previous build of the same kernel), timed interleaved in the same run, instead of the "
                         "stored baselines (the recommended CI gate)")
    group.addoption("--baselines-dir", default=None, metavar="DIR",
                    help="where speed baselines live, one folder per GPU architecture (default: ./baselines "
                         "when it exists or when recording, else the baselines installed with this package)")
    group.addoption("--memory-budget", type=_option_type(float), default=None, metavar="GB",
                    help="report the longest sequence each backend reaches within this much extra memory")
    group.addoption("--fuzz", choices=(*fuzz.PROFILES, "off"), default="ci",
                    help=f"hypothesis settings of the fuzz test: ci ({fuzz.PROFILES['ci']['max_examples']} examples, "
                         "derandomized; default), "
                         "dev (100), thorough (1000), off")


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    if config.getoption("list_backends"):
        from conformance.listing import backend_listing

        print("\n".join(backend_listing()))
        return 0
    return None


def pytest_configure(config):
    config.addinivalue_line("markers", f"{CHECK_MARKER}(name): a conformance test of the named check")
    config.addinivalue_line("markers", f"{FUZZ_MARKER}: the property-based conformance test")
    workerinput = getattr(config, "workerinput", None)  # set in a pytest-xdist worker
    if workerinput is not None:
        workers.pin(workerinput)
    try:
        session = ConformanceSession(config)
    except (SelectionError, ResultsFileError) as exc:
        raise pytest.UsageError(str(exc)) from None
    config.stash[SESSION] = session
    config.pluginmanager.register(Hooks(session), "attention-conformance-session")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    """``-n auto`` on a GPU host: one worker per visible GPU (not one per CPU core)."""
    if config.getoption("device") in (None, "cuda"):
        return len(workers.visible_gpus()) or None
    return None


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """The controller gives each pytest-xdist worker its GPU before the worker starts."""
    config = node.config
    if config.getoption("device") not in (None, "cuda"):
        return
    gpus = workers.visible_gpus()
    gpu, shared_by = workers.assign(node.gateway.id, len(config.getoption("tx") or []), gpus)
    node.workerinput[workers.GPU_KEY] = gpu
    node.workerinput[workers.SHARED_KEY] = shared_by


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config, machine_info):
    """pytest-benchmark's machine info knows no GPU: add what our baselines record (model, compute
    capability, driver, CUDA, cuDNN, torch and backend package versions) to any benchmark it saves."""
    import torch

    from conformance.baselines import machine_info as gpu_machine_info

    machine_info["attention_conformance"] = gpu_machine_info("cuda" if torch.cuda.is_available() else "cpu")


class Hooks:
    """The hooks that need the run's session."""

    def __init__(self, session: ConformanceSession):
        self.session = session

    def pytest_report_header(self):
        s = self.session.selection
        named = ", ".join(s.backend_specs) or "every backend available here (see --list-backends)"
        lines = [f"attention-conformance: device {s.device}, tier {s.tier}, backends: {named}"]
        if not self.session.runner.protected:
            lines.append("attention-conformance: --isolation=none: kernels run in this process, so a kernel can "
                         "change the reference or the verdict; use it to debug, never to certify")
        return lines

    def pytest_generate_tests(self, metafunc):
        session, s = self.session, self.session.selection
        marker = metafunc.definition.get_closest_marker(CHECK_MARKER)
        if marker is not None:
            check = CHECKS[marker.args[0]]
            params = []
            # each backend's grid realised in its declared space, case-major (grid.parametrize)
            for backend, case, unrealised in grid.parametrize(check, s.backends(), s.device, s.tier, s.case_ids):
                reasons = unrealised or session.skip_reasons(check.name, backend, case)
                marks = [pytest.mark.skip(reason=f"{backend.name}: {'; '.join(reasons)}")] if reasons else []
                params.append(pytest.param(backend, case, marks=marks, id=f"{backend.name}-{case.id}"))
            metafunc.parametrize(("attn_backend", "attn_case"), params)
        elif metafunc.definition.get_closest_marker(FUZZ_MARKER) is not None:
            params = [pytest.param(backend, check, id=f"{backend.name}-{check}")
                      for backend in s.backends() for check in CORRECTNESS_CHECKS]
            metafunc.parametrize(("attn_backend", "attn_fuzz_check"), params)

    def pytest_collection_modifyitems(self, config, items):
        s = self.session.selection
        keep, drop = [], []
        for item in items:
            marker = item.get_closest_marker(CHECK_MARKER)
            if marker is not None:
                wanted = marker.args[0] in s.checks
            elif item.get_closest_marker(FUZZ_MARKER) is not None:
                wanted = "fuzz" in s.checks and self.session.fuzz_profile != "off" and not s.case_ids
            else:
                wanted = True
            (keep if wanted else drop).append(item)
        if drop:
            config.hook.pytest_deselected(items=drop)
            items[:] = keep

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item, call):
        report = yield
        final = call.when == "call" or (call.when == "setup" and not report.passed)
        marker = item.get_closest_marker(CHECK_MARKER)
        ours = marker or item.get_closest_marker(FUZZ_MARKER)
        if final and ours and hasattr(item, "callspec"):
            params, learnt = item.callspec.params, item.stash.get(LEARNT, {})
            outcome = learnt.get("outcome", report.outcome)
            report.attention_record = self.session.record(  # travels with the report (pytest-xdist)
                nodeid=item.nodeid, backend=params["attn_backend"],
                check=marker.args[0] if marker else params["attn_fuzz_check"],
                case=params.get("attn_case") or learnt.get("case"), fuzz=marker is None, outcome=outcome,
                duration=report.duration, learnt=learnt, report_text=str(report.longrepr))
        return report

    def pytest_runtest_logreport(self, report):
        record = getattr(report, "attention_record", None)
        if record is not None:
            self.session.recorder.add(record)

    def pytest_terminal_summary(self, terminalreporter):
        records = self.session.recorder.records
        if not records:
            return
        terminalreporter.write_sep("=", "attention conformance")
        for line in (summary.failure_groups(records) + summary.table(records) + summary.coverage(records)
                     + summary.measurements(records)):
            terminalreporter.write_line(line)
        if self.session.recorder.path:
            terminalreporter.write_line(f"results journal: {self.session.recorder.path}")
        for file, entries in self.session.baselines_written:
            terminalreporter.write_line(f"baselines written: {file} ({entries} entries from this run)")
        for name in self.session.contract_breakers():
            terminalreporter.write_line(f"usage error: backend {name} does not follow the calling convention "
                                        "(see its [contract] findings); exit status 4", red=True)
        for name in self.session.untested():
            terminalreporter.write_line(f"nothing tested: no case of backend {name} passed (all skipped or not run; "
                                        "see the skip reasons above); exit status 1", red=True)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session, exitstatus):
        self.session.baselines_written = self.session.write_baselines()
        if self.session.contract_breakers():
            session.exitstatus = pytest.ExitCode.USAGE_ERROR
        elif self.session.untested() and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
        self.session.recorder.finish(int(session.exitstatus))

    def pytest_unconfigure(self):
        self.session.close()


@pytest.fixture
def attn_check(request):
    """Runs this test's check on a backend and case, and reports it in pytest's terms: a failed
    verdict, a crash, a timeout or a harness error fails with a rerun line; unsupported, oom and not
    run skip."""
    session = request.config.stash[SESSION]
    check = request.node.get_closest_marker(CHECK_MARKER).args[0]

    def run(backend, case):
        learnt = request.node.stash.setdefault(LEARNT, {})
        reason = session.given_up_on(backend)
        if reason:
            learnt.update(outcome=Outcome.NOT_RUN, reasons=[reason])
            pytest.skip(reason)
        result = session.run(check, backend, case)
        learnt.update(outcome=result.outcome, result=result)
        if result.outcome in (Outcome.SKIPPED, Outcome.OOM):
            learnt["reasons"] = [result.message]
            pytest.skip(f"{backend.name}: {'unsupported' if result.outcome == Outcome.SKIPPED else 'oom'}: "
                        f"{result.message}")
        failure = session.failure_text(check, backend, case, result)
        if failure:
            pytest.fail(failure, pytrace=False)

    return run


@pytest.fixture
def attn_fuzz(request):
    """Runs a check on hypothesis-drawn cases within the backend's declaration (fuzz_driver.py)."""
    session = request.config.stash[SESSION]

    def run(backend, check):
        learnt = request.node.stash.setdefault(LEARNT, {})
        reason = session.given_up_on(backend)
        if reason:
            learnt.update(outcome=Outcome.NOT_RUN, reasons=[reason])
            pytest.skip(reason)
        try:
            fuzz_check(session, backend, check, learnt)
        except NotFuzzable as exc:
            learnt.update(outcome=Outcome.SKIPPED, reasons=str(exc).split("; "))
            pytest.skip(f"{backend.name}: {exc}")

    return run
