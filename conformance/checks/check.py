"""``Check``: what a check declares, once; each check module's ``CHECK`` (listed in checks.CHECKS)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from conformance.case import Case
from conformance.features import present
from conformance.verdict import Verdict


@dataclass(frozen=True)
class Check:
    """name: what --check selects; cases(tier): its grid; run(backend, case, device[, options]);
    needs: backend features it requires beyond the case (capability flags); feature: the case feature
    all its cases exercise (None: plain attention), which the fuzzer draws; measures: it measures
    rather than compares (takes the run's options; not fuzzed, not part of certify's conformance);
    skip_reason(backend, case, device, options): decided at collection that a case is not measured;
    intents, pairwise: the grid as intents, realised per backend (grid.py); reference: what of the
    case's own float64 reference the check compares with, None, "output", or "gradients" (the output, and
    dq, dk, dv where the backend has a backward), so that on the CPU it is computed while the kernel
    runs (expected.soon)."""

    name: str
    cases: Callable[[str], list[Case]]
    run: Callable[..., Verdict]
    needs: tuple[str, ...] = ()
    feature: str | None = None
    measures: bool = False
    skip_reason: Callable[..., str | None] | None = None
    # The grid as intents (conformance/grid.py): intents() -> [Intent]; pairwise(caps, device, level) ->
    # [Intent] over the backend's declared values. Checks without intents keep cases(tier) as it is.
    intents: Callable[[], list] | None = None
    pairwise: Callable[..., list] | None = None
    reference: str | None = None

    def lacks_feature(self, case: Case) -> str | None:
        """Why ``case`` is no case of this check (a --case id without the feature it exercises), or None."""
        has = case.causal is not None if self.feature == "causal" else self.feature in {f.name for f in present(case)}
        if self.feature is not None and not has:
            return f"the {self.name} check exercises {self.feature}, which case {case.id} does not have"
        return None
