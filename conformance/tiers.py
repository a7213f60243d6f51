"""Tiers: how much a run tests. Each tier is one declared ``Tier`` object, and everything that depends
on the tier reads it from here: the grid level of every check (a tier holds the intents of its level
and of every level below it), the default per-case time limit (plugin), and the memory check's sweep
lengths per device.

Adding a tier is one ``register(Tier(...))`` call below, next to the built-in ones: ``--tier`` accepts
it, every check's grid gives it the level's intents, and the timeout and memory sweep come with it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the plugin reads the tiers in every pytest run: nothing heavy at import
    from conformance.case import Case

# Grid levels, smallest first: a check's cases() lists its intents per level (quick, standard, full).
LEVELS = ("quick", "standard", "full")


@dataclass(frozen=True)
class Tier:
    """One tier, declared once.

    name: the value of ``--tier``.
    level: which of the grid levels (``LEVELS``: 0 quick, 1 standard, 2 full) the tier runs; it runs that
      level's intents and every lower level's.
    case_timeout_s: the default limit per case (``--case-timeout`` overrides it).
    memory_sweep: the memory check's sequence lengths per device ("cpu", "cuda").
    description: one line for ``--help`` and the README.
    """

    name: str
    level: int
    case_timeout_s: float
    memory_sweep: dict[str, tuple[int, ...]] = field(default_factory=dict)
    description: str = ""

    def __post_init__(self):
        if not 0 <= self.level < len(LEVELS):
            raise ValueError(f"tier {self.name!r}: level must be 0..{len(LEVELS) - 1} ({', '.join(LEVELS)})")
        if not self.case_timeout_s > 0:
            raise ValueError(f"tier {self.name!r}: case_timeout_s must be > 0")

    def sweep(self, device: str) -> tuple[int, ...]:
        """The memory check's lengths on ``device`` (a device the tier does not name gets the cpu sweep)."""
        return self.memory_sweep.get(device) or self.memory_sweep.get("cpu", (256, 512, 1024))


_REGISTRY: dict[str, Tier] = {}
TIERS: tuple[str, ...] = ()  # the registered names, in registration order (the choices of --tier)
DEFAULT_TIER = "standard"


def register(tier: Tier) -> Tier:
    """Declare a tier (its name must be new); returns it."""
    global TIERS
    if tier.name in _REGISTRY:
        raise ValueError(f"tier {tier.name!r} is already declared")
    _REGISTRY[tier.name] = tier
    TIERS = tuple(_REGISTRY)
    return tier


def get(name: str) -> Tier:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown tier {name!r}; choose one of {', '.join(TIERS)}") from None


def all_tiers() -> list[Tier]:
    return list(_REGISTRY.values())


register(Tier("quick", 0, 60.0, {"cpu": (256, 512, 1024), "cuda": (1024, 2048, 4096, 8192)},
              "every commit: each check's quick intents"))
register(Tier("standard", 1, 120.0, {"cpu": (256, 512, 1024, 2048),
                                     "cuda": (1024, 2048, 4096, 8192, 16384, 32768)},
              "the default: quick and standard intents, pairwise combinations, long half-precision cases"))
register(Tier("full", 2, 600.0, {"cpu": (256, 512, 1024, 2048, 4096),
                                 "cuda": (1024, 2048, 4096, 8192, 16384, 32768, 65536)},
              "nightly: every level"))


def level(tier: str) -> int:
    return get(tier).level


def grid(tier: str, quick: Iterable[Case], standard: Iterable[Case] = (), full: Iterable[Case] = ()) -> list[Case]:
    """The cases of ``tier``'s level and the levels below it, each seeded from its own fields, without
    duplicates, in a stable order."""
    levels = (quick, standard, full)[: level(tier) + 1]
    seen: dict[str, Case] = {}
    for cases in levels:
        for case in cases:
            case = case.seeded()
            seen.setdefault(case.id, case)
    return list(seen.values())
