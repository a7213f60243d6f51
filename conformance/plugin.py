"""The pytest plugin (entry point ``pytest11: attention_conformance``): options and hooks only. The
run's state and policy live on a ``ConformanceSession`` (session.py); the fuzz driver, the listing,
the journal and the summary have modules of their own.

Installed, this module loads in every pytest run of the environment, so it is a good citizen there:

- **Options.** Each option is ``--attn-NAME``; its short form ``--NAME`` (``--backend``, ``--device``,
  ...) is added after the initial conftests have registered theirs, and only where no other plugin or
  conftest defines ``--NAME``: in a repository whose conftest defines ``--device``, that option is
  theirs and ours is ``--attn-device``.
- **Weight.** At load it imports pytest, argparse and the light ``options``, ``tiers`` and ``workers``
  modules only. The run is ours when one of our options is given, a ``conformance-*`` hypothesis
  profile is named, or the run's arguments name the suite (``--pyargs conformance.suite``, or its
  folder); only then are torch, hypothesis and the checks imported, the session built, the header
  and the summary printed. A run that collects a test of the suite some other way (``pytest .`` above
  an installed copy) becomes ours when that test is collected.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from conformance import options, workers

if TYPE_CHECKING:
    from conformance.session import ConformanceSession

CHECK_MARKER, FUZZ_MARKER = "attention_check", "attention_fuzz"
GROUP = "attention-conformance"
SESSION = pytest.StashKey["ConformanceSession"]()
LEARNT = pytest.StashKey[dict]()  # what a test learnt, for its journal record
SHORT_NAMES = pytest.StashKey[tuple]()  # the short option names that are ours in this run
OURS = pytest.StashKey[bool]()  # whether the command line makes this run ours
SUITE_DIR = Path(__file__).resolve().parent / "suite"


def pytest_addoption(parser):
    group = parser.getgroup(GROUP, "attention kernel conformance (each --attn-NAME also as --NAME, where no "
                                   "other plugin or conftest defines --NAME)")
    for name, settings in options.declared().items():
        group.addoption(options.canonical(name), dest=options.dest(name), **settings)


@pytest.hookimpl(wrapper=True)
def pytest_load_initial_conftests(early_config, parser, args):
    """After the initial conftests have registered their options, our short names where they are free.
    (pytest parses the command line in full after this hook, so options added here are read.)"""
    result = yield
    taken = {name for group in [*parser._groups, parser._anonymous] for option in group.options
             for name in option.names()}
    group = parser.getgroup(GROUP)
    ours = []
    for name, settings in options.declared().items():
        if f"--{name}" not in taken:
            group.addoption(f"--{name}", dest=options.dest(name), **{**settings, "help": argparse.SUPPRESS})
            ours.append(name)
    early_config.stash[SHORT_NAMES] = tuple(ours)
    return result


def is_ours(config) -> bool:
    """Whether the command line makes this run a conformance run: one of our options given (a value
    other than its default), a conformance-* hypothesis profile named, or the suite among the run's
    arguments."""
    if OURS not in config.stash:
        given = any(config.getoption(options.dest(name)) != settings["default"]
                    for name, settings in options.declared().items())
        profile = str(config.getoption("hypothesis_profile", None) or "")
        config.stash[OURS] = (given or profile.startswith("conformance-")
                              or any(_names_the_suite(str(arg), config) for arg in config.args))
    return config.stash[OURS]


def _names_the_suite(arg: str, config) -> bool:
    target = arg.split("::")[0]
    if config.option.pyargs and not Path(config.invocation_params.dir, target).exists():
        return target in ("conformance", "conformance.suite") or target.startswith("conformance.suite.")
    path = Path(config.invocation_params.dir, target).resolve()
    if path == SUITE_DIR or SUITE_DIR in path.parents:
        return True
    if path in SUITE_DIR.parents:  # a folder above the suite: pytest collects it unless it skips a folder between
        between = SUITE_DIR.relative_to(path).parts[:-1]
        return not any(part.startswith(".") or part in ("site-packages", "dist-packages") for part in between)
    return False


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    if config.getoption("attn_list_backends"):
        from conformance.listing import backend_listing

        print("\n".join(backend_listing()))
        return 0
    return None


@pytest.hookimpl(tryfirst=True)  # before hypothesis loads --hypothesis-profile, before pytest-benchmark's storage
def pytest_configure(config):
    config.addinivalue_line("markers", f"{CHECK_MARKER}(name): a conformance test of the named check")
    config.addinivalue_line("markers", f"{FUZZ_MARKER}: the property-based conformance test")
    plugin = Conformance(config)
    config.pluginmanager.register(plugin, "attention-conformance-session")
    if is_ours(config):
        _no_benchmark_storage(config)
        plugin.activate()


def _no_benchmark_storage(config):
    """pytest-benchmark creates its storage folder (``--benchmark-storage``, ./.benchmarks) when it is
    configured, in every run, whether or not any benchmark runs. The suite runs none; unless this run
    saves or compares pytest-benchmark results, its storage is pointed at the current folder, which
    exists, so nothing is created (its pytest_configure is trylast: this runs before it)."""
    if config.getoption("benchmark_storage", None) is None:
        return
    if any(config.getoption(name, None) for name in ("benchmark_save", "benchmark_autosave", "benchmark_compare")):
        return
    config.option.benchmark_storage = "file://."


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    """``-n auto`` on a GPU host: one worker per visible GPU (not one per CPU core), in our runs only."""
    if is_ours(config) and config.getoption("attn_device") in (None, "cuda"):
        return len(workers.visible_gpus()) or None
    return None


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Under ``--dist=load`` (xdist's default with ``-n``), a conformance run gives each worker whole case
    families (scheduling.py), so a compiled kernel compiles a variant once, not in every worker."""
    if is_ours(config) and config.getoption("dist") == "load":
        from conformance import scheduling

        return scheduling.scheduler(config, log)
    return None


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """The controller gives each pytest-xdist worker its GPU before the worker starts (our runs only)."""
    config = node.config
    if not is_ours(config) or config.getoption("attn_device") not in (None, "cuda"):
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


def junit_properties(record: dict) -> list[tuple[str, object]]:
    """A case's facts as junit XML properties (``--junitxml``): backend, check, case, outcome, and the
    comparison nearest its bound or past it (error, bound, which comparison), and the rerun line."""
    props = [("backend", record["backend"]), ("check", record["check"]), ("case", record.get("case_id", "")),
             ("outcome", record["outcome"])]
    comparisons = [c for c in record.get("comparisons") or [] if c.get("bound")]
    if comparisons:
        worst = max(comparisons, key=lambda c: c["error"] / c["bound"])
        props += [("error", worst["error"]), ("bound", worst["bound"]), ("comparison", worst["name"])]
    if record.get("rerun"):
        props.append(("rerun", record["rerun"]))
    return props


class Conformance:
    """The hooks of one pytest run. Inert (every hook returns at once) until the run is ours:
    ``activate`` builds the session, from pytest_configure or when a test of the suite is collected."""

    def __init__(self, config):
        self.config = config
        self.session: ConformanceSession | None = None

    def activate(self) -> ConformanceSession:
        if self.session is not None:
            return self.session
        config = self.config
        workerinput = getattr(config, "workerinput", None)  # set in a pytest-xdist worker
        if workerinput is not None:
            workers.pin(workerinput)  # before anything can start CUDA here
        from conformance import threads

        threads.huge_pages()  # before the first tensor here and the kernel's process (threads.py)
        threads.compile_threads(int(workerinput.get("workercount", 1)) if workerinput is not None else 1)
        from conformance.fuzz_driver import register_profiles
        from conformance.results import ResultsFileError
        from conformance.selection import SelectionError
        from conformance.session import ConformanceSession

        register_profiles()  # --hypothesis-profile=conformance-NAME can select one
        try:
            session = ConformanceSession(config, short_names=config.stash.get(SHORT_NAMES, ()))
        except (SelectionError, ResultsFileError) as exc:
            raise pytest.UsageError(str(exc)) from None
        config.stash[SESSION] = self.session = session
        from conformance import progress  # where the run is; the judge's torch threads on a busy machine

        config.pluginmanager.register(progress.Progress(config), "attention-conformance-progress")
        threads.limit()
        return session

    def pytest_report_header(self):
        if self.session is None:
            return None
        s = self.session.selection
        named = "every backend usable here (see --attn-list-backends)"
        if s.backend_specs:
            named = ", ".join(s.backend_specs)
        elif not self.config.pluginmanager.has_plugin("dsession"):  # not a pytest-xdist controller (no kernel here)
            try:  # the ones this run tests
                usable = [b.name for b in s.backends()]
                named = (", ".join(usable) + " (every backend usable here; --backend to choose)" if usable
                         else "none usable here (see --attn-list-backends)")
            except Exception:  # noqa: BLE001 - the collection reports it; the header must not fail first
                pass
        lines = [f"attention-conformance: device {s.device}, tier {s.tier}, backends: {named}"]
        if not self.session.runner.protected:
            lines.append("attention-conformance: --isolation=none: kernels run in this process, so a kernel can "
                         "change the reference or the verdict; use it to debug, never to certify")
        return lines

    def pytest_generate_tests(self, metafunc):
        marker = metafunc.definition.get_closest_marker(CHECK_MARKER)
        fuzz = metafunc.definition.get_closest_marker(FUZZ_MARKER)
        if marker is None and fuzz is None:
            return
        from conformance import grid
        from conformance.checks import CHECKS, CORRECTNESS_CHECKS

        session = self.activate()
        s = session.selection
        if marker is not None:
            check = CHECKS[marker.args[0]]
            params = []
            # each backend's grid realised in its declared space, case-major (grid.parametrize)
            for backend, case, unrealised in grid.parametrize(check, s.backends(), s.device, s.tier, s.case_ids):
                reasons = unrealised or session.skip_reasons(check.name, backend, case)
                marks = [pytest.mark.skip(reason=f"{backend.name}: {'; '.join(reasons)}")] if reasons else []
                params.append(pytest.param(backend, case, marks=marks, id=f"{backend.name}-{case.id}"))
            metafunc.parametrize(("attn_backend", "attn_case"), params)
        else:
            params = [pytest.param(backend, check, id=f"{backend.name}-{check}")
                      for backend in s.backends() for check in CORRECTNESS_CHECKS]
            metafunc.parametrize(("attn_backend", "attn_fuzz_check"), params)

    def pytest_collection_modifyitems(self, config, items):
        if self.session is None:
            return
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
        if self.session is None:
            return report
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
            item.user_properties.extend(junit_properties(report.attention_record))  # junit XML reads them
        return report

    def pytest_runtest_logreport(self, report):
        record = getattr(report, "attention_record", None)
        if record is not None:
            self.activate().recorder.add(record)  # under pytest-xdist the controller learns it is ours here

    def pytest_terminal_summary(self, terminalreporter):
        if self.session is None:
            return
        from conformance import summary

        records = self.session.recorder.records
        if not records:
            return
        terminalreporter.write_sep("=", "attention conformance")
        exact = bool(self.session.selection.case_ids)
        for line in (summary.failure_groups(records) + summary.table(records) + summary.coverage(records, exact)
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
        if self.session is None:
            return
        self.session.baselines_written = self.session.write_baselines()
        if self.session.contract_breakers():
            session.exitstatus = pytest.ExitCode.USAGE_ERROR
        elif self.session.untested() and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
        self.session.recorder.finish(int(session.exitstatus))

    def pytest_unconfigure(self):
        if self.session is not None:
            self.session.close()


@pytest.fixture
def attn_check(request):
    """Runs this test's check on a backend and case, and reports it in pytest's terms: a failed
    verdict, a crash, a timeout or a harness error fails with a rerun line; unsupported, oom and not
    run skip."""
    from conformance.outcomes import Outcome

    session = request.config.stash[SESSION]
    check = request.node.get_closest_marker(CHECK_MARKER).args[0]

    def run(backend, case):
        learnt = request.node.stash.setdefault(LEARNT, {})
        reason = session.given_up_on(backend, case)
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
    from conformance.fuzz_driver import NotFuzzable, fuzz_check
    from conformance.outcomes import Outcome

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
