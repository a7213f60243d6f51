"""Two runs side by side (`attn-conformance compare A B`): two results journals, or two baseline folders.

Journals: each case is keyed by backend, check and case id (a fuzz test by backend and check); the diff
names the new failures (A did not fail, B does), the fixed cases (A failed, B passed), other outcome
changes, error/bound ratios that moved by more than a factor, cases only one side ran, and the speed
medians both measured. Baseline folders (``<arch>/<backend>.json``): the change of each entry's median.
A regression is a new failure or a median slower by more than the threshold; ``compare`` then exits 1.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from conformance import results

FAILING = ("failed", "crashed", "timed out", "harness error")


@dataclass
class Diff:
    lines: list[str] = field(default_factory=list)
    new_failures: int = 0
    slowdowns: int = 0

    @property
    def regressed(self) -> bool:
        return bool(self.new_failures or self.slowdowns)


def _key(record: dict) -> tuple[str, str, str]:
    case = record.get("case_id") or ("fuzz" if record.get("fuzz") else record.get("nodeid", "?"))
    return record["backend"], record["check"], case


def _name(key: tuple[str, str, str]) -> str:
    return "/".join(key)


def error_ratio(record: dict) -> float | None:
    """The largest error/bound ratio of a case's tolerance comparisons (above 1: out of bounds)."""
    ratios = [c["error"] / c["bound"] for c in record.get("comparisons") or []
              if isinstance(c.get("error"), (int, float)) and isinstance(c.get("bound"), (int, float)) and c["bound"] > 0]
    return max(ratios) if ratios else None


def speed_medians(record: dict) -> dict[str, float]:
    """The speed check's medians of one case record, keyed by its baseline key (mode:case id)."""
    speed = (record.get("measurements") or {}).get("speed") or {}
    return {k: e["median_ms"] for k, e in speed.items() if isinstance(e, dict) and e.get("median_ms")}


def _first_finding(record: dict) -> str:
    findings = record.get("findings") or []
    return f" [{findings[0]['property']}] {findings[0]['message'].splitlines()[0][:160]}" if findings else ""


def _speed_lines(pairs: dict[str, tuple[float, float]], slowdown: float, diff: Diff, unit: str = "ms") -> None:
    for name, (a, b) in sorted(pairs.items(), key=lambda kv: -(kv[1][1] / kv[1][0])):
        change = b / a - 1
        slower = change > slowdown
        diff.slowdowns += slower
        diff.lines.append(f"  {'SLOWER ' if slower else ''}{name}: {a:.4f} -> {b:.4f} {unit} ({100 * change:+.1f}%)")


def journals(path_a: str | Path, path_b: str | Path, slowdown: float = 0.10, ratio_factor: float = 2.0) -> Diff:
    a, b = results.read(path_a), results.read(path_b)
    diff = Diff()
    for name, path, journal in (("A", path_a, a), ("B", path_b, b)):
        h = journal.header
        state = "complete" if journal.complete else "INCOMPLETE (no end record)"
        diff.lines.append(f"{name}: {path}: run {h.get('run_id')} started {h.get('started')}, "
                          f"device {h.get('device')}, tier {h.get('tier')}, {len(journal.cases)} cases, {state}")
    cases_a = {_key(r): r for r in a.cases}
    cases_b = {_key(r): r for r in b.cases}
    new, fixed, changed, ratios, speed = [], [], [], [], {}
    for key, rb in cases_b.items():
        ra = cases_a.get(key)
        if ra is None:
            if rb["outcome"] in FAILING:
                new.append(f"  {_name(key)}: {rb['outcome']} (not in A){_first_finding(rb)}")
            continue
        oa, ob = ra["outcome"], rb["outcome"]
        if ob in FAILING and oa not in FAILING:
            new.append(f"  {_name(key)}: {oa} -> {ob}{_first_finding(rb)}")
        elif oa in FAILING and ob == "passed":
            fixed.append(f"  {_name(key)}: {oa} -> passed")
        elif oa != ob:
            changed.append(f"  {_name(key)}: {oa} -> {ob}")
        xa, xb = error_ratio(ra), error_ratio(rb)
        if xa and xb and abs(math.log(xb / xa)) > math.log(ratio_factor):
            ratios.append((xb / xa, f"  {_name(key)}: error/bound {xa:.3g} -> {xb:.3g} (x{xb / xa:.2f})"))
        ma, mb = speed_medians(ra), speed_medians(rb)
        for k in ma.keys() & mb.keys():
            speed[f"{key[0]}/{k}"] = (ma[k], mb[k])
    only_a = [k for k in cases_a if k not in cases_b]
    only_b = [k for k in cases_b if k not in cases_a]
    diff.new_failures = len(new)
    sections = [(f"new failures ({len(new)})", new), (f"fixed ({len(fixed)})", fixed),
                (f"other outcome changes ({len(changed)})", changed),
                (f"error/bound ratios changed more than x{ratio_factor:g} ({len(ratios)})",
                 [line for _, line in sorted(ratios, reverse=True)])]
    for title, lines in sections:
        if lines:
            diff.lines += [title + ":", *lines]
    if speed:
        diff.lines.append(f"speed medians ({len(speed)}; slower than {100 * slowdown:g}% is a regression):")
        _speed_lines(speed, slowdown, diff)
    if only_a or only_b:
        diff.lines.append(f"cases only in A: {len(only_a)}, only in B: {len(only_b)} (not compared)")
    if not b.complete:
        diff.lines.append("B did not finish: its missing cases are not a pass")
    diff.lines.append(_verdict(diff, len(cases_a.keys() & cases_b.keys()), "cases"))
    return diff


def _verdict(diff: Diff, compared: int, what: str) -> str:
    if diff.regressed:
        return (f"REGRESSION: {diff.new_failures} new failure(s), {diff.slowdowns} slowdown(s) "
                f"over {compared} {what} compared")
    return f"no regression over {compared} {what} compared"


def _baseline_entries(folder: Path) -> dict[str, float]:
    entries = {}
    files = sorted(folder.rglob("*.json"))
    if not files:
        raise ValueError(f"{folder} holds no baseline files (<arch>/<backend>.json)")
    for file in files:
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"baseline {file} is not valid JSON ({exc})") from None
        if not isinstance(data, dict) or not isinstance(data.get("cases"), dict):
            raise ValueError(f"{file} is not a baseline file (no 'cases')")
        where = file.relative_to(folder).with_suffix("").as_posix()
        for k, e in data["cases"].items():
            if isinstance(e, dict) and e.get("median_ms"):
                entries[f"{where}/{k}"] = e["median_ms"]
    return entries


def baseline_folders(path_a: str | Path, path_b: str | Path, slowdown: float = 0.10) -> Diff:
    a, b = _baseline_entries(Path(path_a)), _baseline_entries(Path(path_b))
    diff = Diff([f"A: {path_a} ({len(a)} entries)", f"B: {path_b} ({len(b)} entries)"])
    pairs = {k: (a[k], b[k]) for k in a.keys() & b.keys()}
    if pairs:
        diff.lines.append(f"median change per entry (slower than {100 * slowdown:g}% is a regression):")
        _speed_lines(pairs, slowdown, diff)
        changes = sorted(b / a - 1 for a, b in pairs.values())
        diff.lines.append(f"median of the changes {100 * changes[len(changes) // 2]:+.1f}%, "
                          f"range {100 * changes[0]:+.1f}% to {100 * changes[-1]:+.1f}%")
    only_a, only_b = sorted(a.keys() - b.keys()), sorted(b.keys() - a.keys())
    if only_a or only_b:
        diff.lines.append(f"entries only in A: {len(only_a)}, only in B: {len(only_b)} (not compared)")
    diff.lines.append(_verdict(diff, len(pairs), "entries"))
    return diff


def benchmark_export(path: str | Path, metric: str = "median_ms") -> list[dict]:
    """The speed measurements of a journal in github-action-benchmark's ``customSmallerIsBetter`` format:
    ``[{"name", "unit", "value", "range", "extra"}]``, one entry per backend and baseline key (mode:case id);
    ``metric`` ``ratio`` exports the median over the reference kernel's (machine-independent)."""
    journal = results.read(path)
    out = []
    for r in journal.cases:
        speed = (r.get("measurements") or {}).get("speed") or {}
        for k, e in speed.items():
            if not isinstance(e, dict) or not e.get(metric):
                continue
            extra = [f"tier {r.get('tier')}", f"device {r.get('device')}", f"outcome {r['outcome']}"]
            if e.get("tflops"):
                extra.append(f"{e['tflops']:.1f} TFLOP/s")
            if e.get("rounds"):
                extra.append(f"{e['rounds']} rounds")
            entry = {"name": f"{r['backend']} {k}", "unit": "ms" if metric == "median_ms" else "x reference kernel",
                     "value": e[metric], "extra": "; ".join(extra)}
            if metric == "median_ms" and e.get("iqr_ms") is not None:
                entry["range"] = f"IQR {e['iqr_ms']:.4f}"
            out.append(entry)
    return out
