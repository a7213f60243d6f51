"""Why a result is wrong: the usual bugs of attention kernels, each tested against the kernel's output.

When an output (or dq, dk, dv) fails its comparison, the float64 reference is recomputed under each
hypothesis -- the case with one thing changed the way kernels commonly get it wrong (the softmax scale
dropped, squared or inverted; the inputs read as (batch, heads, seqlen, head_dim), or non-contiguous
inputs read as contiguous; the causal mask missing, applied unasked or with the other alignment; the
fully masked rows' convention; the GQA head mapping; a dropped tail block of keys; another batch
item's keys) -- and the kernel's result is held to it. A hypothesis fits when the result is within the
failed comparison's own bound of that reference, or is clearly closer to it than to the case as given
and to every other hypothesis. With none fitting, the rows that differ are described when they are
a part of the output (which rows, and what they hold: zeros, NaN, the mean of V, another row's
answer). Nothing is said when nothing fits: a wrong guess would cost the reader more than none.

Each hypothesis is proven by a planted bug (tests/mutants.py) that it names, and none names a planted
bug it does not fit (tests/test_diagnosis.py). It runs only on a failed comparison, once per case.
The inputs are regenerated from the case's seed (``inputs.make_inputs``), on the output's device.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from conformance import reference
from conformance.case import Case
from conformance.inputs import make_inputs
from conformance.tolerance import Comparison, max_abs_error

CLEARLY = 20.0  # "clearly best": this many times closer than the case as given, and 5x than the runner-up
RUNNER_UP = 5.0
AMBIGUOUS = 3.0  # a hypothesis is named only if this many times closer than the runner-up and the case given
MAX_SCORES = 1 << 26  # batch*heads*seqlen_q*seqlen_k above which no diagnosis is tried (memory, time)
BLOCKS = (64, 128)
_CONVENTION = {"zeros": "zeros", "mean_v": "the mean of V", "nan": "NaN"}


@dataclass(frozen=True)
class Diagnosis:
    label: str  # stable across cases: what failures are grouped by
    detail: str  # this case's evidence


@dataclass(frozen=True)
class DiagnosedComparison(Comparison):
    """A failed comparison with the diagnosis of its result; ``describe`` ends with it."""

    diagnosis: str = ""
    detail: str = ""

    def describe(self) -> str:
        return f"{super().describe()}; diagnosis: {self.diagnosis}: {self.detail}"


def diagnosed(comparison: Comparison, diagnosis: Diagnosis | None) -> Comparison:
    if diagnosis is None:
        return comparison
    fields = {f.name: getattr(comparison, f.name) for f in dataclasses.fields(Comparison)}
    return DiagnosedComparison(**fields, diagnosis=diagnosis.label, detail=diagnosis.detail)


@dataclass(frozen=True)
class Hypothesis:
    label: str
    detail: str  # "your output equals the reference computed with ..." completes it
    fn: Callable  # (q, k, v) float64 in the case's logical layout -> out, differentiable


# -- the hypotheses ---------------------------------------------------------------------------------
def _plain(case: Case) -> Case:
    return case.replace(layout="contiguous")


def _ref(case: Case, masked_rows: str, prepare=None, finish=None):
    def fn(q, k, v):
        if prepare is not None:
            q, k, v = prepare(q, k, v)
        out = reference.attention(q, k, v, case, upcast=True, masked_rows=masked_rows)
        return out if finish is None else finish(out)
    return fn


def _read_as_contiguous(case: Case):
    """What a kernel that ignores strides reads from the case's non-contiguous inputs (tests/mutants.py
    stride_bug): the storage's first elements, from each tensor's offset, in (B, S, H, D) order."""
    if case.layout == "bhsd":
        return lambda q, k, v: tuple(t.transpose(1, 2).reshape(t.shape) for t in (q, k, v))
    if case.layout == "packed":
        def read(q, k, v):
            flat = torch.cat([q, k, v], dim=2).reshape(-1)
            offsets = (0, q.shape[2] * q.shape[3], (q.shape[2] + k.shape[2]) * q.shape[3])
            return tuple(flat[o: o + t.numel()].view(t.shape) for o, t in zip(offsets, (q, k, v)))
        return read
    return None


def hypotheses(case: Case, masked_rows: str) -> list[Hypothesis]:
    """Those that can differ from the case as given (e.g. no alignment swap when seqlen_q == seqlen_k)."""
    base, hs = _plain(case), []

    def add(label, detail, changed=None, *, prepare=None, finish=None, rows=masked_rows):
        hs.append(Hypothesis(label, detail, _ref(changed or base, rows, prepare, finish)))

    s, d = case.scale, case.head_dim
    if s != 1.0:
        add("softmax scale not applied (scores unscaled)", "softmax_scale=1.0", base.replace(softmax_scale=1.0))
    add("softmax scale applied twice (squared)",
        f"softmax_scale={s * s:.6g}" + (" = 1/head_dim (the scale squared)" if case.softmax_scale is None else
                                        " (the scale squared)"), base.replace(softmax_scale=s * s))
    if s != 1.0:
        add("softmax scale inverted (multiplied by sqrt(head_dim))", f"softmax_scale={1 / s:.6g} (1/scale)",
            base.replace(softmax_scale=1 / s))
    if case.softmax_scale is not None and abs(case.softmax_scale - d**-0.5) > 1e-12:
        add("softmax_scale argument ignored (default 1/sqrt(head_dim) used)",
            f"the default softmax_scale=1/sqrt({d})={d**-0.5:.6g} instead of the {case.softmax_scale:g} passed",
            base.replace(softmax_scale=None))
    other = {"bottom_right": "top_left", "top_left": "bottom_right"}
    if case.causal is not None:
        if case.seqlen_q != case.seqlen_k:
            add(f"causal alignment swapped ({other[case.causal].replace('_', '-')} used for "
                f"{case.causal.replace('_', '-')})", f"causal={other[case.causal]!r}",
                base.replace(causal=other[case.causal]))
        add("causal mask missing", "causal=None (no mask)", base.replace(causal=None))
    else:
        for align in ("bottom_right", "top_left")[:1 if case.seqlen_q == case.seqlen_k else 2]:
            add(f"causal mask applied when not asked ({align.replace('_', '-')})", f"causal={align!r}",
                base.replace(causal=align))
    if reference.fully_masked_rows(base) is not None:
        for convention in reference.MASKED_ROW_CONVENTIONS:
            if convention != masked_rows:
                add(f"fully masked rows hold {_CONVENTION[convention]} (declared: {_CONVENTION[masked_rows]})",
                    f"masked_rows={convention!r}", rows=convention)
    if 1 < case.nheads_k < case.nheads:
        group = case.nheads // case.nheads_k
        add("GQA head mapping: query head h reads kv head h % nheads_k (repeat, not repeat_interleave)",
            f"key/value head h % {case.nheads_k} for query head h instead of h // {group}",
            base.replace(nheads_k=case.nheads),
            prepare=lambda q, k, v: (q, k.repeat(1, 1, group, 1), v.repeat(1, 1, group, 1)))
    kept_seen = set()
    for block in BLOCKS:
        kept = case.seqlen_k // block * block
        if 0 < kept < case.seqlen_k and kept not in kept_seen and case.cache_seqlens is None:
            kept_seen.add(kept)
            add("dropped tail key block (keys past the last full block ignored)",
                f"only the first {kept} of {case.seqlen_k} keys (a multiple of {block}): keys {kept}.."
                f"{case.seqlen_k - 1} dropped", base.replace(seqlen_k=kept),
                prepare=lambda q, k, v, n=kept: (q, k[:, :n], v[:, :n]))
    if case.seqlen_q % case.seqlen_k == 0 and not case.alibi:
        transposed = base.replace(seqlen_q=case.nheads, seqlen_k=case.nheads_k, nheads=case.seqlen_q,
                                  nheads_k=case.seqlen_k, softmax_scale=case.scale)
        add("layout transposed (inputs read as (batch, heads, seqlen, head_dim))",
            "q, k, v read as (batch, heads, seqlen, head_dim): attention across heads, seqlen taken for heads",
            transposed, prepare=lambda q, k, v: tuple(t.transpose(1, 2) for t in (q, k, v)),
            finish=lambda out: out.transpose(1, 2))
    read = _read_as_contiguous(case)
    if read is not None:
        what = ("their (batch, heads, seqlen, head_dim) storage read as (batch, seqlen, heads, head_dim)"
                if case.layout == "bhsd" else "the packed qkv storage read as three contiguous tensors")
        add("strides ignored (non-contiguous inputs read as contiguous)", what, prepare=read)
    if case.batch > 1:
        for shift in (1, -1)[:1 if case.batch == 2 else 2]:
            add("batch items mixed (keys/values of another batch item)",
                f"batch item b attending to the keys and values of item b{-shift:+d}",
                prepare=lambda q, k, v, n=shift: (q, k.roll(n, dims=0), v.roll(n, dims=0)))
    return hs


# -- judging them -----------------------------------------------------------------------------------
def _mismatch(actual: torch.Tensor, ref: torch.Tensor) -> tuple[float, int]:
    """max abs error over finite values and the count of finite/non-finite disagreements (tolerance.compare)."""
    ref_nan = torch.isnan(ref)
    nonfinite = int(((~torch.isfinite(actual)) & ~ref_nan).sum() + (ref_nan & ~torch.isnan(actual)).sum())
    return max_abs_error(actual, ref), nonfinite


def _pick(scored: list[tuple[float, bool, Hypothesis]], given_error: float) -> tuple[Hypothesis, str] | None:
    """scored: (error in units of the failed comparison's bound, free of non-finite disagreements,
    hypothesis); ``given_error`` the result's error (same units) against the case as given. The one
    within the bound, else the clearly best; None when none is, or when another explains the result
    about as well (e.g. logits so large that any scale gives the same one-hot softmax)."""
    finite = sorted((e, i, h) for i, (e, ok, h) in enumerate(scored) if ok)
    if not finite:
        return None
    best, _, h = finite[0]
    runner_up = finite[1][0] if len(finite) > 1 else float("inf")
    if best * AMBIGUOUS > runner_up or best * AMBIGUOUS > given_error:
        return None
    if best <= 1.0:
        return h, "within the bound"
    if best * CLEARLY <= given_error and best * RUNNER_UP <= runner_up:
        return h, f"{best:.1f}x the bound, the closest by far"
    return None


def _too_big(case: Case) -> bool:
    return (case.batch * case.nheads * case.seqlen_q * case.seqlen_k > MAX_SCORES or case.varlen is not None
            or case.cache_seqlens is not None)


def diagnose_output(case: Case, out: torch.Tensor, masked_rows: str, comparison: Comparison,
                    bound: torch.Tensor | None = None) -> Diagnosis | None:
    """The hypothesis the failed ``comparison`` of ``out`` fits, else the wrong rows described, else None.
    ``bound``: what each element is held to where it differs by row ((1, seqlen_q, 1, 1), forward.py's
    classes of rows); the comparison's bound otherwise."""
    if _too_big(case):
        return None
    inputs = make_inputs(case, out.device)
    q, k, v = (t.detach().to(torch.float64) for t in (inputs.q, inputs.k, inputs.v))
    actual = out.detach().to(torch.float64)
    bound = max(comparison.bound, 1e-300) if bound is None else bound.to(actual.device).clamp_min(1e-300)
    given = float("inf") if comparison.nonfinite else comparison.error / max(comparison.bound, 1e-300)
    scored, errors = [], {}
    for h in hypotheses(case, masked_rows):
        with torch.no_grad():
            alt = h.fn(q, k, v)
            err, nonfinite = _mismatch(actual, alt)
            scaled = err / bound if isinstance(bound, float) else max_abs_error(actual / bound, alt / bound)
        scored.append((scaled, nonfinite == 0, h))
        errors[id(h)] = err
    picked = _pick(scored, given)
    if picked is not None:
        h, how = picked
        return Diagnosis(h.label, f"your output equals the reference computed with {h.detail} (max abs error "
                                  f"{errors[id(h)]:.3e}, {how})")
    ref = reference.attention(q, k, v, _plain(case), upcast=True, masked_rows=masked_rows)
    return describe_rows(case, actual, ref, v, bound)


def _ranges(indices: list[int]) -> str:
    parts, start = [], None
    for i, n in enumerate(indices):
        if start is None:
            start = n
        if i + 1 == len(indices) or indices[i + 1] != n + 1:
            parts.append(f"{start}" if start == n else f"{start}..{n}")
            start = None
    text = ", ".join(parts[:4])
    return text + (f" and {len(parts) - 4} more ranges" if len(parts) > 4 else "")


def describe_rows(case: Case, actual: torch.Tensor, ref: torch.Tensor, v: torch.Tensor,
                  bound: float | torch.Tensor) -> Diagnosis | None:
    """Which query rows differ (beyond the bound, or in being finite) and what they hold; None when
    every row differs with nothing recognisable in them. ``bound``: a number, or one per query row
    broadcast as (1, seqlen_q, 1, 1)."""
    bad = ~(((actual - ref).abs() <= bound) | (torch.isnan(actual) & torch.isnan(ref)))  # (b, s, h, d)
    bad_rows = bad.flatten(2).any(-1).any(0)
    rows = bad_rows.nonzero().flatten().tolist()
    if not rows:
        return None
    sq = case.seqlen_q
    sel = actual[:, bad_rows]
    group = case.nheads // case.nheads_k
    mean_v = v.mean(dim=1, keepdim=True).repeat_interleave(group, dim=2).expand_as(actual)[:, bad_rows]
    example = ""
    if bool(torch.isnan(sel).all()):
        holds = "NaN"
    elif bool((sel == 0).all()):
        holds = "zeros"
    elif bool(((sel - mean_v).abs() <= (bound if isinstance(bound, float) else bound[:, bad_rows])).all()):
        holds = "the mean of V"
    else:
        holds, example = _other_rows(actual, ref, rows, bound if isinstance(bound, float)
                                     else float(bound[:, rows].min())) or (None, "")
    if len(rows) == sq and holds is None:
        return None
    if len(rows) == sq:
        return Diagnosis(f"every row holds {holds}", f"all {sq} query rows hold {holds}{example}")
    tail = next((b for b in BLOCKS if rows == list(range(sq // b * b, sq)) and sq // b * b > 0), None)
    where = f"query row{'s' if len(rows) > 1 else ''} {_ranges(rows)} of {sq}"
    holds_text = f", holding {holds}" if holds else ""
    if tail is not None:
        return Diagnosis(f"dropped tail query block (rows past the last full block wrong{holds_text})",
                         f"{where} (those past a multiple of {tail}) differ from the reference{holds_text}"
                         f"{example}; the other rows are right")
    return Diagnosis(f"some query rows wrong{holds_text}",
                     f"{where} differ from the reference{holds_text}{example}; the other rows are right")


def _other_rows(actual, ref, rows: list[int], bound: float) -> tuple[str, str] | None:
    """When each wrong row equals the reference at another row (all batch items and heads at once):
    what they hold, and an example."""
    if len(rows) * ref.shape[1] > 1 << 20:
        return None
    a = actual[:, rows].transpose(0, 1).reshape(len(rows), -1)
    r = ref.transpose(0, 1).reshape(ref.shape[1], -1)
    if not bool(torch.isfinite(a).all()):
        return None
    dist = torch.cdist(a.unsqueeze(0), r.nan_to_num(1e300).unsqueeze(0), p=float("inf"))[0]
    best = dist.min(dim=1)
    if not bool((best.values <= bound).all()):
        return None
    sources = best.indices.tolist()
    offsets = {s - row for s, row in zip(sources, rows)}
    example = f" (row {rows[0]} holds row {sources[0]}'s)"
    if len(offsets) == 1:
        off = offsets.pop()
        return f"the answers of the rows {abs(off)} {'earlier' if off < 0 else 'later'}", example
    return "other rows' answers", example


def diagnose_gradients(case: Case, grads: tuple, masked_rows: str, comparisons: list[Comparison]
                       ) -> Diagnosis | None:
    """For failed dq, dk, dv comparisons: a hypothesis all the failed ones fit, else one of them off by
    a constant factor; None when neither."""
    if _too_big(case):
        return None
    device = grads[0].device
    inputs = make_inputs(case, device)
    leaves = [t.detach().to(torch.float64).requires_grad_(True) for t in (inputs.q, inputs.k, inputs.v)]
    dout = inputs.dout.to(torch.float64)
    actual = [g.detach().to(torch.float64) for g in grads]
    failed = [i for i, c in enumerate(comparisons) if not c.passed]
    bounds = [max(c.bound, 1e-300) for c in comparisons]
    given = max(float("inf") if comparisons[i].nonfinite else comparisons[i].error / bounds[i] for i in failed)
    scored = []
    for h in hypotheses(case, masked_rows):
        with torch.enable_grad():
            ref = torch.autograd.grad(h.fn(*leaves), leaves, dout, allow_unused=True)
        ref = [torch.zeros_like(x) if r is None else r for r, x in zip(ref, leaves)]
        worst, finite = 0.0, True
        for i in range(3):
            err, nonfinite = _mismatch(actual[i], ref[i])
            worst, finite = max(worst, err / bounds[i]), finite and nonfinite == 0
        scored.append((worst, finite, h))
    picked = _pick(scored, given)
    if picked is not None:
        h, how = picked
        return Diagnosis(h.label, f"your dq, dk, dv equal the reference's computed with {h.detail} ({how})")
    with torch.enable_grad():
        ref = torch.autograd.grad(reference.attention(*leaves, _plain(case), upcast=True, masked_rows=masked_rows),
                                  leaves, dout)
    for i in failed:
        c, r = comparisons[i], ref[i]
        norm = float((r * r).sum())
        if comparisons[i].nonfinite or norm == 0:
            continue
        factor = float((actual[i] * r).sum()) / norm
        err, _ = _mismatch(actual[i], factor * r)
        if err <= c.bound or err * CLEARLY <= c.error:
            return Diagnosis(f"{c.name} off by a constant factor",
                             f"your {c.name} equals the reference {c.name} times {factor:.6g} (max abs error "
                             f"{err:.3e} against the bound {c.bound:.3e})")
    return None
