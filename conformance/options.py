"""The run's options: the command-line options the plugin declares, and ``RunOptions``, what the
measuring checks read of them, typed, with one default each (the session builds it from the command
line; the self-tests build it directly).

This module is imported by the plugin in every pytest run of an environment where the package is
installed, so it imports nothing heavy (no torch, no hypothesis): the tiers and the fuzz profiles it
needs are plain data.

Every option has a canonical name ``--attn-NAME`` (its value is ``config.getoption("attn_NAME")``),
and a short alias ``--NAME`` that the plugin adds only where no other plugin or conftest defines
``--NAME`` (plugin.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from conformance import tiers
from conformance.tiers import DEFAULT_TIER

if TYPE_CHECKING:
    from conformance.backend import Backend

PREFIX = "attn-"

# --fuzz=NAME selects one; they are registered with hypothesis as "conformance-NAME" (fuzz_driver.py),
# leaving a project's own profiles alone.
FUZZ_PROFILES = {
    # the same examples every run: no flaky CI; 25 finds every self-test mutant in at least 19 of 20
    # random seeds (tools/fuzz_budget.py 25 20)
    "ci": {"max_examples": 25, "derandomize": True},
    "dev": {"max_examples": 100},
    "thorough": {"max_examples": 1000},
}


def positive_number(kind):
    """An option value parser: a finite number above zero."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a valid {kind.__name__}") from None
        if not value > 0 or math.isinf(value):
            raise ValueError(f"must be a finite number > 0, not {text}")
        return value
    return parse


def _option_type(kind):
    parse = positive_number(kind)

    def checked(text):
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return checked


def dest(name: str) -> str:
    """Where option ``name`` (its short name, e.g. "case-timeout") lands: ``config.getoption(dest(name))``."""
    return (PREFIX + name).replace("-", "_")


def canonical(name: str) -> str:
    return f"--{PREFIX}{name}"


def declared() -> dict[str, dict]:
    """The options, by short name, with their argparse settings (built when pytest asks, so a tier
    registered by then is a choice of --tier)."""
    timeouts = ", ".join(f"{t.name} {t.case_timeout_s:g}" for t in tiers.all_tiers())
    return {
        "backend": dict(action="append", default=[], metavar="NAME",
                        help="backend to test: a registered name, path/to/file.py:function or package.module:function; "
                             "repeatable or comma-separated (default: every backend available here)"),
        "device": dict(choices=("cpu", "cuda"), default=None,
                       help="device to test on (default: cuda when available, else cpu)"),
        "tier": dict(choices=tiers.TIERS, default=DEFAULT_TIER, help=f"size of the case grid (default: {DEFAULT_TIER})"),
        "check": dict(action="append", default=[], metavar="NAME",
                      help="run only these checks (the README's table of checks, or fuzz; an unknown name lists them); "
                           "repeatable or comma-separated"),
        "case": dict(action="append", default=[], metavar="CASE_ID",
                     help="run exactly these case ids (as printed with a failure) instead of the tier's grid"),
        "list-backends": dict(action="store_true", default=False,
                              help="list every known backend, whether it is available here and why not, then exit"),
        "results-file": dict(default="conformance-results.jsonl", metavar="PATH",
                             help="JSON-lines journal of this run's cases, replaced each run ('' to disable)"),
        "isolation": dict(choices=("process", "none"), default="process",
                          help="run the kernel in a process of its own, apart from the judge, replaced when it crashes "
                               "or hangs (default); or in the pytest process, for debugging (verdicts then unprotected)"),
        "case-timeout": dict(type=_option_type(float), default=None, metavar="SECONDS",
                             help=f"a call into the kernel running longer has timed out: a hang detector (default by "
                                  f"tier: {timeouts}; needs --isolation=process)"),
        "crash-limit": dict(type=_option_type(int), default=3, metavar="N",
                            help="after N crashed or timed-out cases in a row, a backend's remaining cases are not run "
                                 "(default 3)"),
        "update-baselines": dict(action="store_true", default=False,
                                 help="measure the speed cases and write them into the baselines of this GPU architecture"),
        "update-missing-baselines": dict(action="store_true", default=False,
                                         help="--update-baselines for the speed cases with no stored entry only (the "
                                              "others skip): continues a recording cut short"),
        "speed-against": dict(default=None, metavar="BACKEND",
                              help="speed check: compare with this backend (a registered name or an import string, e.g. "
                                   "the previous build of the same kernel), timed interleaved in the same run, instead of "
                                   "the stored baselines (the recommended CI gate)"),
        "baselines-dir": dict(default=None, metavar="DIR",
                              help="where speed baselines live, one folder per GPU architecture (default: ./baselines "
                                   "when it exists or when recording, else the baselines installed with this package)"),
        "memory-budget": dict(type=_option_type(float), default=None, metavar="GB",
                              help="report the longest sequence each backend reaches within this much extra memory"),
        "fuzz": dict(choices=(*FUZZ_PROFILES, "off"), default="ci",
                     help=f"hypothesis settings of the fuzz test: ci ({FUZZ_PROFILES['ci']['max_examples']} examples, "
                          "derandomized; default), dev (100), thorough (1000), off"),
    }


@dataclass(frozen=True)
class RunOptions:
    tier: str = DEFAULT_TIER
    baselines_dir: str = "baselines"
    update_baselines: bool = False
    missing_baselines_only: bool = False  # --update-missing-baselines: cases with every mode stored skip
    speed_against: str | None = None  # --speed-against, as given
    speed_against_backend: Backend | None = None  # its declaration, read in the kernel's process
    memory_budget_gb: float | None = None
    gpu_shared_by: int = 1  # pytest-xdist workers sharing this worker's GPU
    # Settings only the self-tests and tools use: time on the CPU, a shorter timing, another device peak.
    allow_cpu_timing: bool = False
    speed_timing: dict = field(default_factory=dict)
    peak_tflops: float | None = None

    def replace(self, **changes) -> RunOptions:
        return dataclasses.replace(self, **changes)
