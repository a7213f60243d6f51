"""The pytest plugin (entry point ``pytest11: attention_conformance``): options, parametrization,
report header, journal records and the verdict table. Wiring only; the work lives in the modules it
calls. The run's state (selection, worker, journal) lives on one ``ConformanceSession`` object,
registered as a plugin of its own when pytest is configured."""

from __future__ import annotations

import argparse
import dataclasses

import hypothesis
import pytest

from conformance import fuzz, isolation, summary, tiers, workers
from conformance.case import Case
from conformance.checks import CHECKS, CORRECTNESS_CHECKS
from conformance.isolation import CRASHED, OOM, TIMED_OUT, UNSUPPORTED, Outcome
from conformance.results import Recorder, ResultsFileError
from conformance.selection import Selection, SelectionError, availability

CHECK_MARKER, FUZZ_MARKER = "attention_check", "attention_fuzz"
SESSION = pytest.StashKey["ConformanceSession"]()
RESULT = pytest.StashKey[dict]()  # what a test learnt, for its journal record


def _positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, not {text}")
        return value
    return parse


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
                    help="run cases in a worker process that is replaced when a backend crashes or hangs "
                         "(default), or in the pytest process")
    group.addoption("--case-timeout", type=_positive(float), default=None, metavar="SECONDS",
                    help="a case running longer has timed out (default by tier: "
                         + ", ".join(f"{t.name} {t.case_timeout_s:g}" for t in tiers.all_tiers())
                         + "; needs --isolation=process)")
    group.addoption("--crash-limit", type=_positive(int), default=3, metavar="N",
                    help="after N crashed or timed-out cases in a row, a backend's remaining cases are not run "
                         "(default 3)")
    group.addoption("--update-baselines", action="store_true",
                    help="measure the speed cases and write them into the baselines of this GPU architecture")
    group.addoption("--speed-against", default=None, metavar="BACKEND",
                    help="speed check: compare with this backend (a registered name or an import string, e.g. the "
                         "previous build of the same kernel), timed interleaved in the same run, instead of the "
                         "stored baselines (the recommended CI gate)")
    group.addoption("--baselines-dir", default="baselines", metavar="DIR",
                    help="where speed baselines live, one folder per GPU architecture (default: baselines)")
    group.addoption("--memory-budget", type=_positive(float), default=None, metavar="GB",
                    help="report the longest sequence each backend reaches within this much extra memory")
    group.addoption("--fuzz", choices=(*fuzz.PROFILES, "off"), default="ci",
                    help="hypothesis settings of the fuzz test: ci (20 examples, derandomized; default), "
                         "dev (100), thorough (1000), off")


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    if config.getoption("list_backends"):
        print("\n".join(backend_listing()))
        return 0
    return None


def backend_listing() -> list[str]:
    lines = []
    for backend, reasons in availability():
        name = backend if isinstance(backend, str) else backend.name
        lines.append(f"{name:<15} " + ("available" if not reasons else "unavailable: " + "; ".join(reasons)))
        if not isinstance(backend, str):
            if backend.description:
                lines.append(f"{'':<15} {backend.description}")
            lines.append(f"{'':<15} {backend.capabilities.summary()}")
    return lines


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
    config.pluginmanager.register(session, "attention-conformance-session")


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


class ConformanceSession:
    def __init__(self, config):
        self.config = config
        self.selection = Selection.from_options(config.getoption("backend"), config.getoption("device"),
                                                config.getoption("tier"), config.getoption("check"),
                                                config.getoption("case"))
        workerinput = getattr(config, "workerinput", {})
        self.worker, self.gpu = workerinput.get("workerid"), workerinput.get(workers.GPU_KEY)
        # under pytest-xdist the controller keeps the journal, from the records the workers' reports carry
        self.recorder = Recorder(None if self.worker else config.getoption("results_file"),
                                 {"device": self.selection.device, "tier": self.selection.tier})
        self.timeout = config.getoption("case_timeout") or tiers.get(self.selection.tier).case_timeout_s
        self.crash_limit = config.getoption("crash_limit")
        self.fuzz_profile = config.getoption("fuzz")
        self.options = {"tier": self.selection.tier, "baselines_dir": config.getoption("baselines_dir"),
                        "update_baselines": config.getoption("update_baselines"),
                        "speed_against": config.getoption("speed_against"),
                        "memory_budget_gb": config.getoption("memory_budget"),
                        "gpu_shared_by": workerinput.get(workers.SHARED_KEY, 1)}
        self.crash_streak: dict[str, int] = {}
        self._runner = None

    # -- running ---------------------------------------------------------------------------------
    def runner(self):
        if self._runner is None:
            isolated = self.config.getoption("isolation") == "process"
            self._runner = isolation.Isolated() if isolated else isolation.InProcess()
        return self._runner

    def given_up_on(self, backend) -> str | None:
        if self.crash_streak.get(backend.name, 0) >= self.crash_limit:
            return f"not run: {backend.name} crashed or timed out on {self.crash_limit} cases in a row (--crash-limit)"
        return None

    def run(self, check: str, backend, case: Case) -> Outcome:
        outcome = self.runner().run(check, backend, case, self.selection.device, self.timeout, self.options)
        failed_hard = outcome.kind in (CRASHED, TIMED_OUT)
        self.crash_streak[backend.name] = self.crash_streak.get(backend.name, 0) + 1 if failed_hard else 0
        return outcome

    def failure_text(self, check: str, backend, case: Case, outcome: Outcome) -> str | None:
        """The failure message (with its rerun line) of an outcome, or None when it did not fail."""
        if outcome.kind in (CRASHED, TIMED_OUT):
            text = (f"{check} check {outcome.kind} for backend {backend.name!r} on case {case.id} "
                    f"({self.selection.device}): {outcome.message}")
        elif outcome.kind == isolation.VERDICT and not outcome.verdict.passed:
            text = outcome.verdict.message()
        else:
            return None
        return f"{text}\n  rerun: {self.selection.rerun_command(check, backend, case)}"

    def skip_reasons(self, check: str, backend, case: Case) -> list[str]:
        """Why a case is not run, decided at collection: outside the declaration, or not measurable here."""
        module = CHECKS[check]
        reasons = backend.capabilities.not_supported_reasons(case, self.selection.device, module.NEEDS)
        if not reasons and hasattr(module, "skip_reason"):
            reasons = [r for r in [module.skip_reason(backend, case, self.selection.device, self.options)] if r]
        return reasons

    # -- hooks -----------------------------------------------------------------------------------
    def pytest_report_header(self):
        s = self.selection
        named = ", ".join(s.backend_specs) or "every backend available here (see --list-backends)"
        return f"attention-conformance: device {s.device}, tier {s.tier}, backends: {named}"

    def pytest_generate_tests(self, metafunc):
        s = self.selection
        marker = metafunc.definition.get_closest_marker(CHECK_MARKER)
        if marker is not None:
            check = CHECKS[marker.args[0]]
            params = []
            for case in s.cases(check.NAME):  # case-major, so backends share each case's reference
                for backend in s.backends():
                    reasons = self.skip_reasons(check.NAME, backend, case)
                    marks = [pytest.mark.skip(reason=f"{backend.name}: {'; '.join(reasons)}")] if reasons else []
                    params.append(pytest.param(backend, case, marks=marks, id=f"{backend.name}-{case.id}"))
            metafunc.parametrize(("attn_backend", "attn_case"), params)
        elif metafunc.definition.get_closest_marker(FUZZ_MARKER) is not None:
            params = [pytest.param(backend, check, id=f"{backend.name}-{check}")
                      for backend in s.backends() for check in CORRECTNESS_CHECKS]
            metafunc.parametrize(("attn_backend", "attn_fuzz_check"), params)

    def pytest_collection_modifyitems(self, config, items):
        s = self.selection
        keep, drop = [], []
        for item in items:
            marker = item.get_closest_marker(CHECK_MARKER)
            if marker is not None:
                wanted = marker.args[0] in s.checks
            elif item.get_closest_marker(FUZZ_MARKER) is not None:
                wanted = "fuzz" in s.checks and self.fuzz_profile != "off" and not s.case_ids
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
        ours = item.get_closest_marker(CHECK_MARKER) or item.get_closest_marker(FUZZ_MARKER)
        if final and ours and hasattr(item, "callspec"):
            report.attention_record = self.record(item, report)  # travels with the report (pytest-xdist)
        return report

    def pytest_runtest_logreport(self, report):
        record = getattr(report, "attention_record", None)
        if record is not None:
            self.recorder.add(record)

    def record(self, item, report) -> dict:
        s = self.selection
        params = item.callspec.params
        backend = params["attn_backend"]
        learnt = item.stash.get(RESULT, {})
        marker = item.get_closest_marker(CHECK_MARKER)
        check = marker.args[0] if marker else params["attn_fuzz_check"]
        case = params.get("attn_case") or learnt.get("case")
        outcome = learnt.get("outcome", report.outcome)
        record = {"record": "case", "nodeid": item.nodeid, "backend": backend.name, "check": check,
                  "device": s.device, "tier": s.tier, "outcome": outcome, "duration_s": round(report.duration, 6),
                  "fuzz": marker is None}
        if self.worker:
            record.update(worker=self.worker, gpu=self.gpu)
        if case is not None:
            record.update(case_id=case.id, case=dataclasses.asdict(case), rerun=s.rerun_command(check, backend, case))
        if outcome in ("skipped", "not run", "oom"):
            record["reasons"] = learnt.get("reasons") or (self.skip_reasons(check, backend, case) if case else [])
        if "verdict" in learnt:
            record.update(learnt["verdict"].as_dict())
        if outcome in (CRASHED, TIMED_OUT):
            record["findings"] = [{"property": outcome, "message": learnt["message"]}]
        elif report.failed and "findings" not in record:
            record["findings"] = [{"property": "harness", "message": str(report.longrepr)[-2000:]}]
        return record

    def contract_breakers(self) -> list[str]:
        """Backends that returned something other than attention's output (a plug-in or adapter that
        does not follow the calling convention: a usage error, not a numerical finding)."""
        return sorted({r["backend"] for r in self.recorder.records
                       if any(f["property"] == "contract" for f in r.get("findings", []))})

    def pytest_terminal_summary(self, terminalreporter):
        if not self.recorder.records:
            return
        terminalreporter.write_sep("=", "attention conformance")
        for line in summary.table(self.recorder.records) + summary.measurements(self.recorder.records):
            terminalreporter.write_line(line)
        if self.recorder.path:
            terminalreporter.write_line(f"results journal: {self.recorder.path}")
        for name in self.contract_breakers():
            terminalreporter.write_line(f"usage error: backend {name} does not follow the calling convention "
                                        "(see its [contract] findings); exit status 4", red=True)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session):
        if self.contract_breakers():
            session.exitstatus = pytest.ExitCode.USAGE_ERROR

    def pytest_unconfigure(self):
        self.recorder.close()
        if self._runner is not None:
            self._runner.close()


@pytest.fixture
def attn_check(request):
    """Runs this test's check on a backend and case, and reports it in pytest's terms: a failed
    verdict, a crash or a timeout fails with a rerun line; unsupported, oom and not run skip."""
    session = request.config.stash[SESSION]
    check = request.node.get_closest_marker(CHECK_MARKER).args[0]

    def run(backend, case):
        learnt = request.node.stash.setdefault(RESULT, {})
        reason = session.given_up_on(backend)
        if reason:
            learnt.update(outcome="not run", reasons=[reason])
            pytest.skip(reason)
        outcome = session.run(check, backend, case)
        if outcome.kind in (UNSUPPORTED, OOM):
            learnt.update(outcome="skipped" if outcome.kind == UNSUPPORTED else OOM, reasons=[outcome.message])
            pytest.skip(f"{backend.name}: {outcome.kind}: {outcome.message}")
        if outcome.kind in (CRASHED, TIMED_OUT):
            learnt.update(outcome=outcome.kind, message=outcome.message)
        else:
            learnt["verdict"] = outcome.verdict
        failure = session.failure_text(check, backend, case, outcome)
        if failure:
            pytest.fail(failure, pytrace=False)

    return run


@pytest.fixture
def attn_fuzz(request):
    """Runs a check on hypothesis-drawn cases within the backend's declaration; a failure shrinks to a
    minimal case, reported with its rerun line. Cases the backend refuses at run time are rejected."""
    session = request.config.stash[SESSION]

    def run(backend, check):
        reason = session.given_up_on(backend)
        if reason:
            request.node.stash[RESULT] = {"outcome": "not run", "reasons": [reason]}
            pytest.skip(reason)
        module = CHECKS[check]
        reasons = fuzz.not_fuzzable_reasons(backend.capabilities, module.NEEDS, module.CASE_FEATURE)
        if reasons:
            request.node.stash[RESULT] = {"outcome": "skipped", "reasons": reasons}
            pytest.skip(f"{backend.name}: {'; '.join(reasons)}")
        learnt = request.node.stash.setdefault(RESULT, {})

        strategy = fuzz.cases(backend.capabilities, session.selection.device, module.NEEDS, module.CASE_FEATURE)

        @fuzz.profile(session.fuzz_profile)
        @hypothesis.given(case=strategy)
        def example(case):
            outcome = session.runner().run(check, backend, case, session.selection.device, session.timeout,
                                           session.options)
            hypothesis.assume(outcome.kind not in (UNSUPPORTED, OOM))
            failure = session.failure_text(check, backend, case, outcome)
            if failure:  # the last failure reported is the minimal one hypothesis replays
                learnt.clear()
                learnt.update(case=case, outcome=outcome.kind if outcome.kind != isolation.VERDICT else "failed",
                              message=outcome.message)
                if outcome.verdict is not None:
                    learnt["verdict"] = outcome.verdict
                raise AssertionError(failure)

        example()

    return run
