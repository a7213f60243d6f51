"""Every check has power: each mutant is caught by the check meant for it, on that check's quick grid,
while the correct backends pass every check there."""

import pytest

from conformance import fuzz, grid
from conformance.backends import naive, sdpa_math, tiled
from conformance.checks import CHECKS, CORRECTNESS_CHECKS, execute
from mutants import MUTANTS


def verdicts(backend, check, tier="quick"):
    """The check on the grid the backend gets: its intents realised in its declared space."""
    for r in grid.for_backend(CHECKS[check], backend.capabilities, "cpu", tier):
        if r.case is not None:
            yield execute(check, backend, r.case, "cpu")


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m.backend.name)
def test_mutant_is_caught_by_its_check(mutant):
    failed = set()
    for verdict in verdicts(mutant.backend, mutant.check):
        failed |= verdict.failed_properties
    assert mutant.prop in failed, f"{mutant.backend.name} escaped the {mutant.check} check (failed: {failed or 'none'})"


@pytest.mark.parametrize("mutant", [m for m in MUTANTS if m.prop != "contract"], ids=lambda m: m.backend.name)
def test_mutant_is_subtle(mutant):
    """A planted bug that broke every case would prove little about the grid; each passes some case."""
    assert any(v.passed for check in CORRECTNESS_CHECKS for v in verdicts(mutant.backend, check))


# Each correct backend with each check it declares what is needed for (naive and sdpa-math have no
# window, softcap or ALiBi: those pairs would run nothing and could not fail).
DECLARED = [(b, c) for b in (naive.BACKEND, sdpa_math.BACKEND, tiled.BACKEND) for c in CORRECTNESS_CHECKS
            if not fuzz.not_fuzzable_reasons(b.capabilities, CHECKS[c].needs, CHECKS[c].feature)]


@pytest.mark.parametrize("backend, check", DECLARED, ids=lambda x: getattr(x, "name", x))
def test_correct_backends_pass(backend, check):
    ran = list(verdicts(backend, check))
    failures = [v.message() for v in ran if not v.passed]
    assert ran and not failures, "\n".join(failures) or "no case ran"
