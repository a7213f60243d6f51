"""Cases as intents, realised in each backend's declared space.

A check's grid is a list of ``Intent``s: what a case is *for* (a seqlen just past a block boundary,
seqlen_q != seqlen_k, GQA, a non-contiguous view, large logits, a long half-precision sum...), written
as a nominal ``Case`` plus the fields whose nominal value is the point (``pinned``). ``realise`` turns
an intent into a case the backend declares, or into the reasons it cannot:

- dtype: the nominal one if declared; otherwise (unless pinned) the other 16-bit dtype, then float32...
  On CUDA an fp32 or fp64 intent that does not pin its dtype is realised in fp16 or bf16 (alternating by
  intent), as GPU kernels are used; the fp32/fp64 intents that pin their dtype run where declared.
- head dim: the nominal one if declared, else the nearest declared one (unless pinned).
- seqlens: rounded to the declared multiple keeping the intent: a length 2^j + 1 >= 65 ("just past a
  block") becomes the next *odd* multiple (with multiple 128: 65, 129, 257 -> 384, "one multiple past a
  boundary"), others round up (a short length becomes one multiple); seqlen_q != seqlen_k stays unequal (the longer one moves one more multiple if the
  rounding made them equal); a backend declaring equal seqlens cannot realise an unequal intent.
- causal alignment: where seqlen_q != seqlen_k and the nominal alignment is not declared, the declared
  one (unless pinned).
- paged KV block size: the next declared multiple (16 and 64 -> 256 for flash-attn 2.x), with as many
  blocks per item and each cache length as far from its block's end as the intent's.
Everything else the intent has (causal, GQA, scale, layout, magnitude, window...) is kept; if the
backend does not declare it, the intent is not realisable, with the declaration's reasons.

Besides hand-written intents, each value-comparing check gets a **pairwise** (strength-2 covering
array) set of intents over dtype, causal alignment, seqlen relation and offset, length class, GQA ratio,
scale, layout, magnitude, batch and head dim, built over the values the backend declares, so every pair
of declared values meets in at least one case. Backends with the same declaration get identical
cases (the float64 reference is then computed once per case for all of them).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

from conformance import tiers
from conformance.capabilities import Capabilities
from conformance.case import ALIGNMENTS, Case

HALF = ("fp16", "bf16")
PINNABLE = ("dtype", "head_dim", "seqlens", "alignment")


@dataclass(frozen=True)
class Intent:
    purpose: str
    case: Case  # nominal values
    level: int = 0  # grid level (tiers.LEVELS): 0 quick, 1 standard, 2 full
    pinned: frozenset = frozenset()  # of PINNABLE: fields whose nominal value is the intent itself


def intent(purpose: str, case: Case, level: int = 0, pin: tuple[str, ...] = ()) -> Intent:
    unknown = set(pin) - set(PINNABLE)
    if unknown:
        raise ValueError(f"cannot pin {sorted(unknown)}; pinnable: {PINNABLE}")
    return Intent(purpose, case, level, frozenset(pin))


@dataclass(frozen=True)
class Realised:
    intent: Intent
    case: Case | None  # None: not realisable
    reasons: tuple[str, ...] = ()


def _salt(text: str) -> int:
    return zlib.crc32(text.encode())


def _dtype(it: Intent, caps: Capabilities, device: str) -> str | None:
    nominal = it.case.dtype
    if "dtype" in it.pinned:
        return nominal if nominal in caps.dtypes else None
    salt = _salt(it.purpose) % 2
    prefs = []
    if device == "cuda" and nominal not in HALF:
        prefs += [HALF[salt], HALF[1 - salt]]
    prefs.append(nominal)
    if nominal in HALF:
        prefs.append(HALF[1 - HALF.index(nominal)])
    prefs += ["fp32", HALF[salt], HALF[1 - salt], "fp64"]
    return next((d for d in prefs if d in caps.dtypes), None)


def _head_dim(d: int, caps: Capabilities, pinned: bool) -> int | None:
    if caps.supports_head_dim(d):
        return d
    if pinned:
        return None
    if caps.head_dims is not None:
        candidates = sorted(caps.head_dims)
    else:
        candidates = [x for x in range(caps.head_dim_min, caps.head_dim_max + 1) if x % caps.head_dim_multiple == 0]
    return min(candidates, key=lambda x: (abs(x - d), -x)) if candidates else None


def _past_boundary(n: int) -> bool:
    return n > 2 and (n - 1) & (n - 2) == 0  # 2^j + 1


def round_length(n: int, multiple: int) -> int:
    """A length in the declared multiple that keeps what ``n`` was chosen for."""
    if multiple <= 1 or n % multiple == 0:
        return n
    if _past_boundary(n) and n > 64:  # one past a kernel block (64, 128...): one multiple past a boundary
        return multiple * (2 * math.ceil((n - 1) / (2 * multiple)) + 1)
    if n < multiple:
        return multiple
    return multiple * math.ceil(n / multiple)


def realise(it: Intent, caps: Capabilities, device: str, needs: tuple[str, ...] = ()) -> Case | list[str]:
    """The case that realises ``it`` in the backend's declared space, or the reasons it cannot."""
    c, reasons = it.case, []
    dtype = _dtype(it, caps, device)
    if dtype is None:
        reasons.append(f"dtype {c.dtype} is the intent; declared: {', '.join(sorted(caps.dtypes))}")
    head_dim = _head_dim(c.head_dim, caps, "head_dim" in it.pinned)
    if head_dim is None:
        reasons.append(f"head dim {c.head_dim} is the intent; declared: {caps.head_dim_text()}")
    m = caps.seqlen_multiple
    sq, sk = round_length(c.seqlen_q, m), round_length(c.seqlen_k, m)
    varlen = None if c.varlen is None else tuple(round_length(n, m) for n in c.varlen)
    if varlen is not None:
        sq = sk = max(varlen)
    if "seqlens" in it.pinned and (sq, sk) != (c.seqlen_q, c.seqlen_k):
        reasons.append(f"seqlens {c.seqlen_q}/{c.seqlen_k} are the intent; declared: multiples of {m}")
    if c.seqlen_q != c.seqlen_k:
        if caps.equal_seqlens:
            reasons.append(f"seqlen_q != seqlen_k is the intent ({c.seqlen_q}/{c.seqlen_k}); declared: equal only")
        elif sq == sk:
            if c.seqlen_q > c.seqlen_k:
                sq += 2 * max(m, 1)
            else:
                sk += 2 * max(m, 1)
    causal = c.causal
    if causal is not None and causal not in caps.causal and caps.causal and sq != sk and "alignment" not in it.pinned:
        causal = caps.causal[0]
    if reasons:
        return reasons
    changes = dict(dtype=dtype, head_dim=head_dim, seqlen_q=sq, seqlen_k=sk, causal=causal, varlen=varlen)
    cache = c.cache_seqlens
    if c.page_block is not None:
        changes["page_block"], sk, cache = _paged(c, caps.page_block_multiple, m, sk)
        changes["seqlen_k"] = sk
    if cache is not None:
        news = c.new_seqlens or (sq,) * len(cache)  # each item's new tokens (a mixed batch: its own count)
        changes["cache_seqlens"] = tuple(min(n, sk - m) for n, m in zip(cache, news))
    try:
        case = c.replace(**changes).seeded()
    except ValueError as exc:
        return [str(exc)]
    return list(dict.fromkeys(caps.not_supported_reasons(case, device, needs))) or case


def _paged(c: Case, page_multiple: int, seqlen_multiple: int, sk: int) -> tuple[int, int, tuple[int, ...]]:
    """A paged cache's block size in the declared multiple (16 -> 256 for flash-attn 2.x), with as many
    blocks per item as the intent's, each cache length at the same distance from its block's end (a length
    ending inside a block, or new tokens crossing a boundary, still does): (page_block, seqlen_k,
    cache_seqlens)."""
    page = c.page_block
    if page % page_multiple == 0:
        return page, sk, c.cache_seqlens
    new = page_multiple * math.ceil(page / page_multiple)
    blocks = max(1, math.ceil(sk / page))
    step = new * seqlen_multiple // math.gcd(new, seqlen_multiple)
    sk = step * math.ceil(blocks * new / step)
    cache = tuple((n // page) * new + (new - page + n % page if n % page else 0) for n in c.cache_seqlens)
    return new, sk, cache


def realise_all(intents: list[Intent], caps: Capabilities, device: str, needs: tuple[str, ...] = ()) -> list[Realised]:
    """Every intent, realised or not; a realised case equal to an earlier one is kept once (its intent
    is then reached by that case)."""
    out, seen = [], set()
    for it in intents:
        got = realise(it, caps, device, needs)
        if isinstance(got, Case):
            if got.id in seen:
                continue
            seen.add(got.id)
            out.append(Realised(it, got))
        else:
            out.append(Realised(it, None, tuple(got)))
    return out


# -- pairwise ---------------------------------------------------------------------------------------

def covering_array(factors: dict[str, tuple], allowed=lambda row: True) -> list[dict]:
    """A strength-2 covering array: rows (factor -> value) such that every pair of values of two
    factors that ``allowed`` permits appears in some row. Greedy (AETG-style), deterministic."""
    names = [n for n in factors if factors[n]]
    uncovered = set()
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            for va in factors[a]:
                for vb in factors[b]:
                    if allowed({a: va, b: vb}):
                        uncovered.add((a, va, b, vb))
    order = {n: i for i, n in enumerate(names)}
    rows = []

    def pairs(row):
        keys = sorted(row, key=order.get)
        return {(a, row[a], b, row[b]) for i, a in enumerate(keys) for b in keys[i + 1:]}

    while uncovered:
        best, best_gain = None, -1
        for seed in sorted(uncovered, key=repr)[:12]:
            row = {seed[0]: seed[1], seed[2]: seed[3]}
            for n in names:
                if n in row:
                    continue
                options = [v for v in factors[n] if allowed({**row, n: v})]
                if not options:
                    options = list(factors[n])
                row[n] = max(options, key=lambda v: (len(pairs({**row, n: v}) & uncovered), -factors[n].index(v)))
            if not allowed(row):
                continue
            gain = len(pairs(row) & uncovered)
            if gain > best_gain:
                best, best_gain = row, gain
        if best is None or best_gain <= 0:
            break  # what is left cannot be placed in an allowed row
        rows.append(best)
        uncovered -= pairs(best)
    return rows


def factors(caps: Capabilities, device: str, level: int, feature: str | None = None,
            causal_only: bool = False) -> dict[str, tuple]:
    """The pairwise factors' values the backend declares, at a grid level."""
    dtypes = [d for d in (("fp16", "bf16", "fp32") if device == "cuda" else ("fp32", "fp16", "bf16"))
              if d in caps.dtypes]
    alignments = tuple(a for a in ALIGNMENTS if a in caps.causal)  # canonical order: same declaration, same rows
    causal = alignments if causal_only else (None, *alignments)
    relations = ["equal"]
    if not caps.equal_seqlens and feature not in ("varlen",):
        relations += ["q<k", "q>k"]
        if caps.seqlen_multiple == 1:
            relations.append("decode")
    lengths = ["short", "past"] + (["long"] if level >= 1 else [])
    gqa = [1] + ([2] if caps.gqa else []) + (["mqa"] if caps.mqa else [])
    layouts = ["contiguous"] + (["bhsd", "packed"] if caps.noncontiguous and feature is None else [])
    out = {
        "dtype": tuple(dtypes), "causal": causal, "relation": tuple(relations), "length": tuple(lengths),
        "gqa": tuple(gqa), "scale": SCALES if caps.softmax_scale else (None,),
        "layout": tuple(layouts), "magnitude": (1.0, 16.0) if feature is None else (1.0, 4.0),
        "batch": (1, 2, 3), "head_dim": head_dim_palette(caps),
    }
    if level == 0:  # the quick tier: the interactions bugs were found in; the rest pairwise from standard on
        out.update(length=("past",), scale=(None,), magnitude=(1.0,), batch=(2,), head_dim=out["head_dim"][:1])
    return out


SCALES = (None, 0.3)  # the pairwise softmax scales: the default and one other


def head_dim_palette(caps: Capabilities) -> tuple[int, ...]:
    """The pairwise head dims: 64, 128 and 40 (not a power of two), each as the backend realises it."""
    return tuple(dict.fromkeys(d for d in (_head_dim(64, caps, False), _head_dim(128, caps, False),
                                           _head_dim(40, caps, False)) if d is not None))


def _allowed(row: dict) -> bool:
    if row.get("layout") == "packed" and row.get("relation", "equal") != "equal":
        return False
    if row.get("relation") == "decode" and row.get("length") == "short":
        return False
    return True


LENGTHS = {"short": 17, "past": 129, "long": 2113}  # long: keys beyond 2048
PARTNER = {"short": 5, "past": 47, "long": 47}  # the other length where they differ: offsets off any block


def row_case(row: dict, base: Case) -> Case:
    n, p = LENGTHS[row["length"]], PARTNER[row["length"]]
    sq, sk = {"equal": (n, n), "q<k": (p, n), "q>k": (n, p), "decode": (1, n)}[row["relation"]]
    nheads = 4
    nheads_k = {1: 4, 2: 2, "mqa": 1}[row["gqa"]]
    batch = row["batch"] if row["length"] != "long" else 1
    return base.replace(batch=batch, seqlen_q=sq, seqlen_k=sk, nheads=nheads, nheads_k=nheads_k,
                        head_dim=row["head_dim"], dtype=row["dtype"], causal=row["causal"],
                        softmax_scale=row["scale"], layout=row["layout"], magnitude=row["magnitude"], seed=0)


FACTOR_ORDER = ("dtype", "causal", "relation", "length", "gqa", "scale", "layout", "magnitude", "batch", "head_dim")


def describe(row: dict) -> str:
    return "pairwise: " + ", ".join(f"{k}={row[k]}" for k in FACTOR_ORDER if k in row)


def pairwise(base: Case, caps: Capabilities, device: str, level: int, feature: str | None = None,
             causal_only: bool = False) -> list[Intent]:
    rows = covering_array(factors(caps, device, level, feature, causal_only), _allowed)
    return [intent(describe(r), row_case(r, base), level) for r in rows]


def for_backend(check, caps: Capabilities, device: str, tier: str) -> list[Realised]:
    """A check's grid for one backend: its intents up to the tier's level, then (for checks that have
    them) the pairwise intents over the backend's declared values, all realised."""
    level = tiers.level(tier)
    intents = [it for it in check.intents() if it.level <= level]
    if check.pairwise is not None:
        intents += check.pairwise(caps, device, level)
    return realise_all(intents, caps, device, check.needs)


def nominal(intents: list[Intent], tier: str) -> list[Case]:
    """A check's intents up to the tier's level, as written (seeded): its grid for a backend that
    declares everything (the pairwise part depends on the declaration and is not included)."""
    level = tiers.level(tier)
    seen: dict[str, Case] = {}
    for it in intents:
        if it.level <= level:
            case = it.case.seeded()
            seen.setdefault(case.id, case)
    return list(seen.values())


_UNREALISED: dict[tuple[str, str, str], list[str]] = {}


def unrealised_reasons(check: str, backend, case: Case) -> list[str]:
    """The skip reasons of an intent ``parametrize`` found not realisable (for the journal)."""
    return _UNREALISED.get((check, backend.name, case.id), [])


def parametrize(check, backends, device: str, tier: str, case_ids=()) -> list[tuple]:
    """(backend, case, reasons or None) for the plugin: exact ``--case`` ids as given; otherwise each
    backend's realised grid, ordered case-major (a case shared by several backends runs for all of them
    in a row, so the reference is computed once), every intent it cannot realise as a skip with reasons.
    Checks without intents (speed: its benchmarks) keep their fixed ``cases(tier)``."""
    if case_ids:
        return [(b, Case.from_id(i), None) for i in case_ids for b in backends]
    if check.intents is None:
        return [(b, c, None) for c in check.cases(tier) for b in backends]
    by_case: dict[str, list] = {}
    for backend in backends:
        realised = for_backend(check, backend.capabilities, device, tier)
        ids = {r.case.id for r in realised if r.case is not None}
        for r in realised:
            if r.case is not None:
                by_case.setdefault(r.case.id, []).append((backend, r.case, None))
            else:
                nominal_case = r.intent.case.seeded()
                if nominal_case.id in ids:
                    continue  # reached by a case realised from another intent
                reasons = [f"intent not realisable ({r.intent.purpose}): " + "; ".join(r.reasons)]
                _UNREALISED[(check.name, backend.name, nominal_case.id)] = reasons
                by_case.setdefault("~" + nominal_case.id, []).append((backend, nominal_case, reasons))
    return [entry for entries in by_case.values() for entry in entries]
