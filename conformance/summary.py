"""The verdict table printed at the end of a run, built from case records alone (live or journal)."""

from __future__ import annotations

from collections import Counter, defaultdict

OUTCOMES = ("passed", "failed", "skipped")


def table(records: list[dict]) -> list[str]:
    """backend x check cells of passed/failed/skipped counts, a verdict per backend, then the main skip
    reasons of each backend."""
    if not records:
        return ["no conformance cases ran"]
    backends = list(dict.fromkeys(r["backend"] for r in records))
    checks = list(dict.fromkeys(r["check"] for r in records))
    counts: dict = defaultdict(Counter)
    reasons: dict = defaultdict(Counter)
    for r in records:
        counts[r["backend"], r["check"]][r["outcome"]] += 1
        counts[r["backend"], "*"][r["outcome"]] += 1
        if r["outcome"] == "skipped":
            for reason in r.get("reasons") or [r.get("message", "")]:
                reasons[r["backend"]][reason] += 1

    def cell(c: Counter) -> str:
        return "/".join(str(c[o]) for o in OUTCOMES) if c else "-"

    def verdict(c: Counter) -> str:
        if c["failed"] or sum(c.values()) > sum(c[o] for o in OUTCOMES):
            return "FAIL"
        return "pass" if c["passed"] else "no case ran"

    headers = ["backend", *checks, "verdict"]
    rows = [[b, *(cell(counts[b, ch]) for ch in checks), verdict(counts[b, "*"])] for b in backends]
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = ["cells: passed/failed/skipped", fmt.format(*headers), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*row) for row in rows]
    for b in backends:
        if reasons[b]:
            lines.append(f"main skip reasons for {b}:")
            lines += [f"  {n:>4} x {reason}" for reason, n in reasons[b].most_common(3)]
    return lines
