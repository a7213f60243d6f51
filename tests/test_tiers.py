"""A tier is one declared object: adding one (docs/architecture.md's recipe) gives --tier its name, every
check its grid level, the plugin its case timeout and the memory check its sweep."""

import pytest

from conformance import tiers
from conformance.backends import naive
from conformance.checks import CHECKS, memory
from conformance.options import RunOptions


@pytest.fixture
def smoke_tier():
    """The recipe: one register(Tier(...)) call in conformance/tiers.py. Undone afterwards."""
    registry, names = dict(tiers._REGISTRY), tiers.TIERS
    tier = tiers.register(tiers.Tier("smoke", level=0, case_timeout_s=17.0,
                                     memory_sweep={"cpu": (64, 128), "cuda": (1024, 2048)},
                                     description="a test tier"))
    yield tier
    tiers._REGISTRY.clear()
    tiers._REGISTRY.update(registry)
    tiers.TIERS = names


def test_builtin_tiers_are_declared_once():
    assert tiers.TIERS[:3] == ("quick", "standard", "full")
    assert [tiers.get(t).level for t in ("quick", "standard", "full")] == [0, 1, 2]
    assert tiers.get("standard").sweep("cuda")[-1] == 32768
    with pytest.raises(ValueError, match="unknown tier 'nightly'"):
        tiers.get("nightly")
    with pytest.raises(ValueError, match="already declared"):
        tiers.register(tiers.Tier("quick", 0, 1.0))


def test_an_added_tier_works_everywhere(smoke_tier, pytester):
    for check in CHECKS:  # every grid accepts it, at its level
        assert [c.id for c in CHECKS[check].cases("smoke")] == [c.id for c in CHECKS[check].cases("quick")]
    verdict = memory.run(naive.BACKEND, memory.cases("smoke")[0], "cpu", options=RunOptions(tier="smoke"))
    assert [n for n, _ in verdict.measurements["fwd"]["curve"]] == [64, 128]
    result = pytester.runpytest("--pyargs", "conformance.suite", "-p", "no:cacheprovider", "--tier=smoke",
                                "--backend=naive", "--check=sanity", "--fuzz=off")
    result.assert_outcomes(passed=len(CHECKS["sanity"].cases("smoke")))
    session = result.reprec.getcalls("pytest_configure")[0].config.stash[__import__("conformance.plugin").plugin.SESSION]
    assert session.timeout == 17.0
