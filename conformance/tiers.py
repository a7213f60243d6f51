"""Tiers size each check's grid: quick for every commit, standard by default, full for nightly runs.

A tier holds its own cases and every case of the tiers below it.
"""

from __future__ import annotations

from collections.abc import Iterable

from conformance.case import Case

TIERS = ("quick", "standard", "full")
DEFAULT_TIER = "standard"


def grid(tier: str, quick: Iterable[Case], standard: Iterable[Case] = (), full: Iterable[Case] = ()) -> list[Case]:
    """The cases of ``tier``, each seeded from its own fields, without duplicates, in a stable order."""
    if tier not in TIERS:
        raise ValueError(f"unknown tier {tier!r}; choose one of {', '.join(TIERS)}")
    levels = (quick, standard, full)[: TIERS.index(tier) + 1]
    seen: dict[str, Case] = {}
    for level in levels:
        for case in level:
            case = case.seeded()
            seen.setdefault(case.id, case)
    return list(seen.values())
