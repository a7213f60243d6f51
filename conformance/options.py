"""``RunOptions``: what the measuring checks read of a run's options, typed, with one default each.
The session builds it from the command line; the self-tests build it directly."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from conformance.backend import Backend
from conformance.tiers import DEFAULT_TIER


@dataclass(frozen=True)
class RunOptions:
    tier: str = DEFAULT_TIER
    baselines_dir: str = "baselines"
    update_baselines: bool = False
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
