"""The verdict table printed at the end of a run, built from case records alone (live or journal)."""

from __future__ import annotations

import re
import textwrap
from collections import Counter, defaultdict

OUTCOMES = ("passed", "failed", "skipped")
# Outcomes of their own, counted in pytest's terms in the cells and named in a column of their own.
PROBLEMS = {"crashed": "failed", "timed out": "failed", "oom": "skipped", "not run": "skipped"}


REASONS_SHOWN = 5  # skip reasons listed per backend at the end of a run; the journal's summary lists all
WIDTH = 100
_INTENT = re.compile(r"^intent not realisable \((?:[^()]|\([^()]*\))*\): ")


def table(records: list[dict], width: int = WIDTH, reasons_shown: int | None = REASONS_SHOWN) -> list[str]:
    """The backends run, then backend x check cells of passed/failed/skipped counts (wrapped by checks
    within ``width`` columns), a verdict per backend, then each backend's skipped cases by reason (the
    first ``reasons_shown`` reasons; None: all)."""
    if not records:
        return ["no conformance cases ran"]
    backends = list(dict.fromkeys(r["backend"] for r in records))
    checks = list(dict.fromkeys(r["check"] for r in records))
    counts: dict = defaultdict(Counter)
    problems: dict = defaultdict(Counter)
    for r in records:
        outcome = PROBLEMS.get(r["outcome"], r["outcome"])
        counts[r["backend"], r["check"]][outcome] += 1
        counts[r["backend"], "*"][outcome] += 1
        if r["outcome"] in PROBLEMS:
            problems[r["backend"]][r["outcome"]] += 1

    def cell(c: Counter) -> str:
        return "/".join(str(c[o]) for o in OUTCOMES) if c else "-"

    def verdict(c: Counter) -> str:
        if c["failed"]:
            return "FAIL"
        return "pass" if c["passed"] else "no case ran"

    def problem(c: Counter) -> str:
        return ", ".join(f"{n} {kind}" for kind, n in c.items()) or "-"

    where = ", ".join(sorted({f"{r.get('device', '?')}, tier {r.get('tier', '?')}" for r in records}))
    lines = _wrap(f"{len(backends)} backend{'s' if len(backends) > 1 else ''} ({where}): {', '.join(backends)}",
                  width, "    ")
    lines.append("cells: passed/failed/skipped; other: crashed, timed out (as failed), oom, not run (as skipped)")
    columns = [["backend", *backends]]
    columns += [[ch, *(cell(counts[b, ch]) for b in backends)] for ch in checks]
    columns += [["verdict", *(verdict(counts[b, "*"]) for b in backends)],
                ["other", *(problem(problems[b]) for b in backends)]]
    lines += _columns(columns, width)
    for b in backends:
        lines += skip_reasons(records, b, width, reasons_shown)
    return lines + per_gpu(records)


def _columns(columns: list[list[str]], width: int) -> list[str]:
    """Columns side by side, the first one repeated in each block of the others that fits ``width``."""
    widths = [max(len(x) for x in col) for col in columns]
    blocks: list[list[int]] = [[]]
    for i in range(1, len(columns)):
        used = widths[0] + sum(widths[j] + 2 for j in blocks[-1])
        if blocks[-1] and used + widths[i] + 2 > width:
            blocks.append([])
        blocks[-1].append(i)
    lines: list[str] = []
    for block in blocks:
        if lines:
            lines.append("")
        chosen = [0, *block]
        for row in range(len(columns[0])):
            lines.append("  ".join(columns[i][row].ljust(widths[i]) for i in chosen).rstrip())
            if row == 0:
                lines.append("  ".join("-" * widths[i] for i in chosen))
    return lines


def reason_key(reason: str) -> tuple[str, bool]:
    """A skip reason without the intent it was given for: (the reason, whether it was an intent)."""
    bare = _INTENT.sub("", reason)
    return bare, bare != reason


# A reason's family: the reason with the case's own values (a head dim, a length, a dtype...) taken out;
# what the backend declared ("declared: ...", "a multiple of 128", "the maximum 4096") stays in the text.
_SUBJECT = r"\b(head dim|seqlens?|nheads(?:_k)?|dtype|alignment|block size|inputs|is the intent) "
_TOKEN = r"\d+(?:/\d+)*|fp16|bf16|fp32|fp64|fp8|top_left|bottom_right|packed|bhsd"
_VALUE = rf"(\((?:{_TOKEN})\)|(?:{_TOKEN}))(?=[\s,;)]|$)"
_FAMILY = re.compile(_SUBJECT + _VALUE)
VALUE = "*"
VALUES_SHOWN = 8


def reason_family(reason: str) -> tuple[str, tuple[str, ...]]:
    """(the reason with each value of the case replaced by "*", those values)."""
    values: list[str] = []

    def sub(m):
        value = m.group(2)
        bracketed = value.startswith("(")
        values.append(value[1:-1] if bracketed else value)
        return f"{m.group(1)} " + (f"({VALUE})" if bracketed else VALUE)

    return _FAMILY.sub(sub, reason), tuple(values)


def _natural(text: str):
    return [(0, int(x), "") if x.isdigit() else (1, 0, x) for x in re.split(r"(\d+)", text) if x]


def values_text(values) -> str:
    """The values a reason family was given for, compactly: sorted, at most ``VALUES_SHOWN``."""
    ordered = sorted(set(values), key=_natural)
    shown = ", ".join(ordered[:VALUES_SHOWN])
    return shown + (f", ... ({len(ordered)} values)" if len(ordered) > VALUES_SHOWN else "")


def skip_reasons(records: list[dict], backend: str, width: int = WIDTH, shown: int | None = REASONS_SHOWN) -> list[str]:
    """The backend's skipped cases (oom and not run included) per reason, most cases first: each case
    counted once per reason it gives, with the checks it was skipped in. Reasons that differ only in
    the case's values (a head dim, a length) count as one, their values listed."""
    cases: Counter = Counter()
    intents: Counter = Counter()
    where: dict = defaultdict(dict)
    values: dict = defaultdict(list)
    skipped = 0
    for r in records:
        if r["backend"] != backend or PROBLEMS.get(r["outcome"], r["outcome"]) != "skipped":
            continue
        skipped += 1
        keys: dict = {}
        for reason in r.get("reasons") or ["(no reason recorded)"]:
            bare, intent = reason_key(reason)
            family, given = reason_family(bare)
            keys[family] = keys.get(family, False) or intent
            if given:
                values[family].append("/".join(given))
        for key, intent in keys.items():
            cases[key] += 1
            intents[key] += intent
            where[key][("fuzz " if r.get("fuzz") else "") + r["check"]] = None
    if not cases:
        return []
    ranked = cases.most_common()
    listed = ranked if shown is None or len(ranked) <= shown + 1 else ranked[:shown]
    more = len(ranked) - len(listed)
    head = f"skipped cases of {backend}: {skipped}, by reason"
    head += f" (top {len(listed)} of {len(ranked)}; all: attn-conformance summary):" if more else ":"
    lines = _wrap(head, width, "    ")
    for key, n in listed:
        note = f"; {intents[key]} as intents not realisable" if intents[key] else ""
        given = f" ({VALUE} = {values_text(values[key])})" if values[key] else ""
        lines += _wrap(f"{n:>6}  {key}{given} [{', '.join(where[key])}{note}]", width, " " * 8)
    return lines


def _wrap(text: str, width: int, indent: str) -> list[str]:
    return textwrap.wrap(text, width, subsequent_indent=indent, break_on_hyphens=False) or [""]


def run_args(header: dict) -> str:
    """The options a run was started with, from its journal header (the command line after the program)."""
    argv = [str(a) for a in header.get("argv") or []][1:]
    text = " ".join(argv) or "(no options)"
    return text if len(text) <= 70 else text[:67] + "..."


def per_gpu(records: list[dict]) -> list[str]:
    """Under pytest-xdist with one GPU per worker: counts per GPU, so one bad GPU is named, not averaged."""
    gpus: dict = defaultdict(Counter)
    for r in records:
        if r.get("worker"):
            gpus[r.get("gpu"), r["worker"]][PROBLEMS.get(r["outcome"], r["outcome"])] += 1
    if len({gpu for gpu, _ in gpus}) < 2:
        return []
    return ["per GPU:"] + [f"  GPU {gpu} ({worker}): " + ", ".join(f"{c[o]} {o}" for o in OUTCOMES)
                           for (gpu, worker), c in sorted(gpus.items(), key=lambda item: str(item[0]))]


def measurements(records: list[dict]) -> list[str]:
    """Memory curves and speed figures, one line per backend, case and mode."""
    lines = []
    for r in records:
        m = r.get("measurements") or {}
        if r["check"] == "memory":
            for mode in ("fwd", "fwdbwd"):
                if mode in m:
                    x = m[mode]
                    growth = f"N^{x['exponent']:.2f} ({x['measured_class']})" if "exponent" in x else "too few points"
                    budget = (f"; longest within budget: {x['longest_within_budget']}"
                              if "longest_within_budget" in x else "")
                    lines.append(f"  memory {r['backend']} {r.get('case_id')} {mode}: {growth}; {x['text']}{budget}")
        elif r["check"] == "speed":
            for key, x in (m.get("speed") or {}).items():
                pct = f" ({x['pct_of_peak']:.0f}% of peak)" if x.get("pct_of_peak") is not None else ""
                judged = x.get("verdict")
                change = (f"; vs baseline {100 * judged['absolute_change']:+.1f}%, {100 * judged['relative_change']:+.1f}% "
                          f"relative to the reference kernel" if judged else "")
                lines.append(f"  speed {r['backend']} {key}: {x['median_ms']:.3f} ms (IQR {x['iqr_ms']:.3f}), "
                             f"{x['tflops']:.1f} TFLOP/s{pct}{change}")
    return (["measurements:"] + lines) if lines else []


# A backend realising fewer correctness cases than this (over forward, gradients, causal, sanity and
# the feature checks) is named loudly: its green verdict says little about the kernel.
MIN_REALISED = 20
UNREALISABLE = "intent not realisable"


def coverage(records: list[dict], exact_cases: bool = False) -> list[str]:
    """Per backend and check: cases run (passed or failed) / intents not realisable in the backend's
    declaration / other skips; a loud line for a backend under MIN_REALISED correctness cases run,
    unless the run was of ``exact_cases`` (--case: the user chose them)."""
    from conformance.checks import CORRECTNESS_CHECKS

    counts: dict = defaultdict(Counter)
    for r in records:
        if r.get("fuzz"):
            continue
        outcome = PROBLEMS.get(r["outcome"], r["outcome"])
        if outcome == "skipped":
            kind = "unrealisable" if any(UNREALISABLE in x for x in r.get("reasons") or []) else "skipped"
        else:
            kind = "run"
        counts[r["backend"], r["check"]][kind] += 1
    if not counts:
        return []
    backends = list(dict.fromkeys(b for b, _ in counts))
    lines = ["coverage (cases run / intents not realisable / other skips):"]
    for b in backends:
        cells = [f"{ch} {c['run']}/{c['unrealisable']}/{c['skipped']}" for (bb, ch), c in counts.items() if bb == b]
        lines += _wrap(f"  {b}: " + ", ".join(cells), WIDTH, "      ")
        ran = sum(c["run"] for (bb, ch), c in counts.items() if bb == b and ch in CORRECTNESS_CHECKS)
        checked = any(bb == b and ch in CORRECTNESS_CHECKS for bb, ch in counts)
        if checked and ran < MIN_REALISED and not exact_cases:
            lines += _wrap(f"  !!! {b}: only {ran} correctness cases ran (minimum {MIN_REALISED}): this verdict covers "
                           "little of what the kernel is used for; widen its declaration or add cases (--case)",
                           WIDTH, "      ")
    return lines


_FAILED = {"failed", "crashed", "timed out"}


def failure_groups(records: list[dict], width: int = 100, id_lines: int = 2) -> list[str]:
    """Failures that share a cause, once each: per backend and check, the cases whose findings carry the
    same diagnosis (diagnosis.py), or else fail on the same properties, with their count and ids (the
    first ``id_lines`` lines of them). Each case's own text stays in the journal."""
    groups: dict = defaultdict(list)
    for r in records:
        if r.get("outcome") not in _FAILED:
            continue
        findings = r.get("findings") or []
        diagnosed = next((f["diagnosis"] for f in findings if f.get("diagnosis")), None)
        if diagnosed:
            cause = ("fit", diagnosed)
        elif r["outcome"] != "failed":
            cause = ("outcome", r["outcome"])
        else:
            cause = ("properties", ", ".join(sorted({f.get("property", "?") for f in findings})) or "no finding")
        groups[r["backend"], r["check"], cause].append(r.get("case_id") or r.get("nodeid") or "?")
    if not groups:
        return []
    lines = ["failures by cause (each case's findings in full in the journal):"]
    for (backend, check, (kind, what)), ids in sorted(groups.items(), key=lambda g: (-len(g[1]), str(g[0]))):
        n = len(ids)
        cases, fail = (f"{n} cases", "fail") if n > 1 else ("1 case", "fails")
        if kind == "fit":
            text = f"{cases} {fail}, {'all fit' if n > 1 else 'fits'} '{what}'"
        elif kind == "outcome":
            text = f"{cases} {what}"
        else:
            text = f"{cases} {fail} on [{what}], no common cause found"
        lines.append(f"  {backend} {check}: {text}:")
        lines += _id_lines(ids, width, id_lines)
    return lines


def _id_lines(ids: list[str], width: int, most: int) -> list[str]:
    """The ids, comma-separated over at most ``most`` lines of ``width`` columns, then how many more."""
    indent = "      "
    room = width - len(indent)
    rows: list[list[str]] = [[]]
    for case_id in ids:
        if rows[-1] and len(", ".join(rows[-1] + [case_id])) + 1 > room:
            rows.append([])
        rows[-1].append(case_id)
    if len(rows) > most:
        rows = rows[:most]
        shown = sum(map(len, rows))
        while len(rows[-1]) > 1 and len(", ".join(rows[-1])) + len(f", ... and {len(ids) - shown} more") > room:
            rows[-1].pop()
            shown -= 1
        rows[-1].append(f"... and {len(ids) - shown} more")
    return [indent + ", ".join(row) + ("," if i + 1 < len(rows) else "") for i, row in enumerate(rows)]
