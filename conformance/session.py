"""One pytest run's conformance state and policy: what is tested (the selection), where the kernel
runs (the runner), the run options the measuring checks read, the journal, and the rules that turn
case results into pytest outcomes (failure texts, skip reasons, crash streaks, the exit status)."""

from __future__ import annotations

import dataclasses

from conformance import baselines, grid, isolation, scheduling, tiers, workers
from conformance.case import Case
from conformance.checks import CHECKS
from conformance.isolation import CaseResult
from conformance.options import RunOptions, dest
from conformance.outcomes import Outcome
from conformance.results import Recorder
from conformance.selection import Selection, SelectionError


class ConformanceSession:
    def __init__(self, config, short_names=("backend", "device", "check", "case")):
        """``short_names``: the options whose short form (--device) is ours in this run (the plugin's
        SHORT_NAMES); rerun lines use --attn-NAME for the others."""
        def option(name):  # the canonical --attn-NAME's value
            return config.getoption(dest(name))

        isolated = option("isolation") == "process"
        if not isolated and option("case_timeout") is not None:
            raise SelectionError("--case-timeout needs --isolation=process: in the pytest process a hung kernel "
                                 "cannot be stopped")
        tier = option("tier")
        self.timeout = option("case_timeout") or tiers.get(tier).case_timeout_s
        self.runner = isolation.Isolated(self.timeout) if isolated else isolation.InProcess()
        try:
            self.selection = Selection.from_options(option("backend"), option("device"), tier, option("check"),
                                                    option("case"), describe=self.runner.describe,
                                                    short_names=tuple(short_names))
        except BaseException:
            self.runner.close()
            raise
        workerinput = getattr(config, "workerinput", {})
        self.worker, self.gpu = workerinput.get("workerid"), workerinput.get(workers.GPU_KEY)
        # under pytest-xdist the controller keeps the journal, from the records the workers' reports carry
        self.recorder = Recorder(None if self.worker else option("results_file"),
                                 {"device": self.selection.device, "tier": self.selection.tier},
                                 append=bool(option("check") or option("case")))  # a rerun keeps the runs before it
        self.crash_limit = option("crash_limit")
        self.fuzz_profile = option("fuzz")
        self.explicit = bool(option("check") or option("case"))  # skips the user asked for are no warning
        update = option("update_baselines") or option("update_missing_baselines")
        baselines_dir = option("baselines_dir") or baselines.default_dir(update)
        self.options = RunOptions(tier=self.selection.tier, baselines_dir=str(baselines_dir), update_baselines=update,
                                  missing_baselines_only=option("update_missing_baselines"),
                                  speed_against=option("speed_against"),
                                  memory_budget_gb=option("memory_budget"),
                                  gpu_shared_by=workerinput.get(workers.SHARED_KEY, 1))
        self.crash_streak: dict[str, list[str]] = {}  # backend -> the families of its crashes in a row
        self.families_given_up: dict[str, set[str]] = {}  # backend -> families it crashed on --crash-limit times in a row
        self.baselines_written: list[tuple] = []
        if option("speed_against") and "speed" in self.selection.checks:  # its declaration, read where kernels run
            against = self.runner.describe([option("speed_against")])[0]
            if against.backend is None:
                self.close()
                raise SelectionError(f"--speed-against: {against.error}")
            self.options = self.options.replace(speed_against_backend=against.backend)

    def close(self) -> None:
        self.runner.close()
        self.recorder.close()

    # -- running ---------------------------------------------------------------------------------
    def given_up_on(self, backend, case: Case | None = None) -> str | None:
        """After --crash-limit crashes or timeouts in a row, the backend is given up on; when they were all of
        one case family (scheduling.family), that family is, for the rest of the run: under pytest-xdist a
        worker runs a family's cases in a row, and one family a kernel cannot run must not cost it the others."""
        streak = self.crash_streak.get(backend.name, [])
        if len(streak) >= self.crash_limit and len(set(streak)) > 1:
            return f"not run: {backend.name} crashed or timed out on {self.crash_limit} cases in a row (--crash-limit)"
        family = scheduling.family(case) if case is not None else None
        if family in self.families_given_up.get(backend.name, ()):
            return (f"not run: {backend.name} crashed or timed out on {self.crash_limit} cases of this family in a "
                    f"row ({family}; --crash-limit)")
        return None

    def run(self, check: str, backend, case: Case) -> CaseResult:
        result = self.runner.run(check, backend, case, self.selection.device, self.options)
        streak = self.crash_streak.setdefault(backend.name, [])
        if not result.outcome.hard_failure:
            streak.clear()
            return result
        streak.append(scheduling.family(case))
        if len(streak) >= self.crash_limit and len(set(streak[-self.crash_limit:])) == 1:
            self.families_given_up.setdefault(backend.name, set()).add(streak[-1])
        return result

    def failure_text(self, check: str, backend, case: Case, result: CaseResult) -> str | None:
        """The failure message (with its rerun line) of a result, or None when it did not fail."""
        if result.outcome == Outcome.FAILED:
            text = result.verdict.message()
        elif result.outcome.in_pytest_terms == "failed":
            text = (f"{check} check {result.outcome} for backend {backend.name!r} on case {case.id} "
                    f"({self.selection.device}): {result.message}")
        else:
            return None
        return f"{text}\n  rerun: {self.selection.rerun_command(check, backend, case)}"

    def skip_reasons(self, check: str, backend, case: Case) -> list[str]:
        """Why a case is not run, decided at collection: outside the declaration, or not measurable here."""
        declared = CHECKS[check]
        lacking = declared.lacks_feature(case)
        reasons = ([lacking] if lacking else grid.unrealised_reasons(check, backend, case)
                   or backend.capabilities.not_supported_reasons(case, self.selection.device, declared.needs))
        if not reasons and declared.skip_reason is not None:
            reasons = [r for r in [declared.skip_reason(backend, case, self.selection.device, self.options)] if r]
        return reasons

    # -- records ---------------------------------------------------------------------------------
    def record(self, *, nodeid: str, backend, check: str, case: Case | None, fuzz: bool, outcome: str,
               duration: float, learnt: dict, report_text: str) -> dict:
        """The journal record of one test (schema in the README)."""
        s = self.selection
        record = {"record": "case", "nodeid": nodeid, "backend": backend.name, "check": check, "device": s.device,
                  "tier": s.tier, "outcome": str(outcome), "duration_s": round(duration, 6), "fuzz": fuzz}
        if self.worker:
            record.update(worker=self.worker, gpu=self.gpu)
        if case is not None:
            record.update(case_id=case.id, case=dataclasses.asdict(case), rerun=s.rerun_command(check, backend, case))
        if Outcome(outcome).in_pytest_terms == "skipped":
            record["reasons"] = learnt.get("reasons") or (self.skip_reasons(check, backend, case) if case else [])
            if learnt.get("result") is not None:  # refused or out of memory when run, not by declaration
                record["at_run_time"] = True
        result: CaseResult | None = learnt.get("result")
        if result is not None and result.verdict is not None:
            record.update(result.verdict.as_dict())
        elif result is not None and result.outcome.in_pytest_terms == "failed":
            record["findings"] = [{"property": str(result.outcome), "message": result.message}]
        elif outcome == Outcome.FAILED and "findings" not in record:
            record["findings"] = [{"property": "harness", "message": report_text[-2000:]}]
        return record

    def contract_breakers(self) -> list[str]:
        """Backends that returned something other than attention's output (a plug-in or adapter that
        does not follow the calling convention: a usage error, not a numerical finding)."""
        return sorted({r["backend"] for r in self.recorder.records
                       if any(f["property"] == "contract" for f in r.get("findings", []))})

    def untested(self) -> list[str]:
        """Backends with cases in this run but no passing one. Skips by declaration are no warning when
        --check or --case asked for them; refusals and out-of-memory at run time always count."""
        passed: dict[str, int] = {}
        refused: dict[str, int] = {}
        for r in self.recorder.records:
            passed[r["backend"]] = passed.get(r["backend"], 0) + (r["outcome"] == "passed")
            refused[r["backend"]] = refused.get(r["backend"], 0) + bool(r.get("at_run_time"))
        return [name for name, n in passed.items() if n == 0 and (refused[name] or not self.explicit)]

    def write_baselines(self) -> list[tuple]:
        """--update-baselines: every worker's measurements, each baseline file written once."""
        if self.worker:  # under pytest-xdist the controller writes them, from the workers' records
            return []
        updates = baselines.updates(self.recorder.records)
        return baselines.apply(updates) if updates else []
