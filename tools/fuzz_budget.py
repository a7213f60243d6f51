"""How often the fuzzer, at a given budget, finds each self-test mutant: for every mutant in
tests/mutants.py, the number of random seeds (of N) in which hypothesis, drawing cases from the mutant's
declaration only, finds a case its check fails within the budget.

Usage: python tools/fuzz_budget.py [examples (default: the ci profile's)] [seeds (default 10)]
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from hypothesis import HealthCheck, Phase, find, settings
from hypothesis.errors import NoSuchExample

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conformance import fuzz  # noqa: E402
from conformance.checks import CHECKS, execute  # noqa: E402
from mutants import MUTANTS  # noqa: E402


def found(mutant, examples: int, seed: int) -> bool:
    module = CHECKS[mutant.check]
    strategy = fuzz.cases(mutant.backend.capabilities, "cpu", module.needs, module.feature)
    budget = settings(max_examples=examples, database=None, deadline=None, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
    try:
        find(strategy, lambda case: mutant.prop in execute(mutant.check, mutant.backend, case, "cpu").failed_properties,
             settings=budget, random=random.Random(seed))
        return True
    except NoSuchExample:
        return False


def main(examples: int, seeds: int) -> int:
    worst = seeds
    for mutant in MUTANTS:
        hits = sum(found(mutant, examples, seed) for seed in range(seeds))
        worst = min(worst, hits)
        print(f"{mutant.backend.name:<26} {hits}/{seeds}", flush=True)
    print(f"budget {examples} examples: every mutant found in at least {worst} of {seeds} seeds")
    return 0 if worst >= seeds - 1 else 1


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else fuzz.PROFILES["ci"]["max_examples"],
                  int(sys.argv[2]) if len(sys.argv) > 2 else 10))
