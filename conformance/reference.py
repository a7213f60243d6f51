"""The definition every backend is held to: softmax(QKᵀ·scale + mask + bias)·V, written out plainly.

``attention(..., upcast=True)`` computes it in float64 from the backend's own (rounded) inputs: the
reference. ``upcast=False`` computes the same formula in the inputs' dtype, the way a plain PyTorch
implementation would, in one of several equally valid orders of evaluation: their errors against the
reference calibrate the tolerance (see tolerance.py and expected.py).
"""

from __future__ import annotations

import torch

from conformance.case import Case
from conformance.inputs import alibi_slopes, attn_bias

MASKED_ROW_CONVENTIONS = ("zeros", "mean_v", "nan")


def key_range(case: Case, device=None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per query i, the inclusive range [lo_i, hi_i] of keys it may attend to; None when unrestricted.

    Causal masks and sliding windows both leave each query one contiguous range of keys, so this is
    O(seqlen_q) and serves both the mask and the count of fully masked rows (lo_i > hi_i).
    """
    if case.causal is None and case.window is None:
        return None
    i = torch.arange(case.seqlen_q, device=device)
    # Position of query i on the key axis: bottom-right alignment (flash-attn) puts the last query on
    # the last key; top-left (SDPA's is_causal) puts the first query on the first key.
    diag = i + (0 if case.causal == "top_left" else case.seqlen_k - case.seqlen_q)
    lo = torch.zeros_like(i)
    hi = torch.full_like(i, case.seqlen_k - 1)
    if case.causal is not None:
        hi = torch.minimum(hi, diag)
    if case.window is not None:
        left, right = case.window
        if left >= 0:
            lo = torch.maximum(lo, diag - left)
        if right >= 0:
            hi = torch.minimum(hi, diag + right)
    return lo, hi


def allowed(case: Case, device=None) -> torch.Tensor | None:
    """(seqlen_q, seqlen_k) bool: may query i attend to key j? None when every pair may."""
    bounds = key_range(case, device)
    if bounds is None:
        return None
    j = torch.arange(case.seqlen_k, device=device)
    return (j >= bounds[0].unsqueeze(1)) & (j <= bounds[1].unsqueeze(1))


def keep_mask(case: Case, device=None) -> torch.Tensor | None:
    """The case's boolean attn_bias (bias_shape, True = may attend); None for none or a float bias."""
    if case.attn_bias is None or case.bias_kind not in ("keep", "rows"):
        return None
    return attn_bias(case, device)


def fully_masked_rows(case: Case, device=None) -> torch.Tensor | None:
    """Queries that may attend to no key at all; None when there are none. (seqlen_q,) bool from the
    causal mask and window alone; with a boolean attn_bias, (batch or 1, nheads or 1, seqlen_q)."""
    keep = keep_mask(case, device)
    if keep is not None:
        ok = allowed(case, device)
        full = keep.expand(*keep.shape[:2], case.seqlen_q, case.seqlen_k)
        rows = ~(full if ok is None else full & ok).any(-1)
        return rows if bool(rows.any()) else None
    bounds = key_range(case, device)
    if bounds is None:
        return None
    rows = bounds[0] > bounds[1]
    return rows if bool(rows.any()) else None


MIN_CLASS_ROWS = 16


def length_classes(case: Case, device=None) -> list[tuple[int, int, torch.Tensor]] | None:
    """The query rows grouped by how many keys each may attend to, in powers of two (1, 2-3, 4-7, ...;
    a class of fewer than ``MIN_CLASS_ROWS`` rows joined to the next; rows that see no key on their
    own): (fewest, most, row indices) per class. None when every row sees
    as many keys as the others (no causal mask or window). The tolerance rule holds each class to the
    errors of its own rows (tolerance.py): under a causal mask the first rows average a few values and
    are large, the last average thousands and are small, and one bound for both is the first rows'."""
    bounds = key_range(case, device)
    if bounds is None:
        return None
    count = (bounds[1] - bounds[0] + 1).clamp_min(0)
    label = torch.where(count > 0, torch.log2(count.clamp_min(1).double()).floor().long(), -1)
    groups = [(label == c).nonzero().flatten() for c in label.unique().tolist()]
    if label.min() < 0:  # rows that see no key hold the declared value: a class of their own
        empty, groups = [groups[0]], groups[1:]
    else:
        empty = []
    # a class of a few rows has a noisy yardstick (the largest of few errors): merged with the next
    merged = []
    for rows in groups:
        if merged and len(merged[-1]) < MIN_CLASS_ROWS:
            merged[-1] = torch.cat([merged[-1], rows])
        else:
            merged.append(rows)
    if len(merged) > 1 and len(merged[-1]) < MIN_CLASS_ROWS:
        merged[-2:] = [torch.cat(merged[-2:])]
    classes = [(int(count[rows].min()), int(count[rows].max()), rows) for rows in empty + merged]
    return classes if len(classes) > 1 else None


def _rows_bqh1(empty: torch.Tensor) -> torch.Tensor:
    """fully_masked_rows' result laid out to broadcast over (batch, seqlen_q, heads, head_dim)."""
    return empty.view(1, -1, 1, 1) if empty.dim() == 1 else empty.transpose(1, 2).unsqueeze(-1)


def alibi_bias(case: Case, device=None, dtype=torch.float64) -> torch.Tensor:
    """(nheads, seqlen_q, seqlen_k): -slope_h * |i + seqlen_k - seqlen_q - j|, as flash-attn defines it."""
    i = torch.arange(case.seqlen_q, device=device).unsqueeze(1)
    j = torch.arange(case.seqlen_k, device=device).unsqueeze(0)
    dist = (i + case.seqlen_k - case.seqlen_q - j).abs().to(dtype)
    return -alibi_slopes(case.nheads).to(device=device, dtype=dtype).view(-1, 1, 1) * dist


# Equally valid orders of evaluation of the same formula. The float64 reference uses the first; the
# tolerance (tolerance.py) is calibrated by the worst of all of them computed in the case's dtype.
ORDERS = ("scale_q", "scale_k", "scale_scores", "scale_sqrt", "split_sums", "exp2")
LOG2E = 1.4426950408889634


def _keep(t):
    return t


def _scores(q, k, scale, order, r=_keep):
    """(batch, heads, seqlen_q, seqlen_k) scaled scores, the scale applied where ``order`` says; ``r``
    rounds each intermediate to the storage precision (identity unless emulating a 16-bit computation)."""
    def qk(a, b):
        return r(torch.einsum("bqhd,bkhd->bhqk", a, b))

    if order == "scale_q":  # flash-attn's reference
        return qk(r(q * scale), k)
    if order == "scale_k":  # flash-attn's reference with reorder_ops
        return qk(q, r(k * scale))
    if order == "scale_sqrt":  # SDPA's math backend
        return qk(r(q * scale**0.5), r(k * scale**0.5))
    if order == "split_sums" and q.shape[-1] > 1:  # another summation order over the head dim
        half = q.shape[-1] // 2
        return r(r(qk(q[..., :half], k[..., :half]) + qk(q[..., half:], k[..., half:])) * scale)
    return r(qk(q, k) * scale)  # "scale_scores": the lab notes' textbook order


def _weighted_sum(probs, v, order, r=_keep):
    def pv(p, x):
        return r(torch.einsum("bhqk,bkhd->bqhd", p, x))

    if order == "split_sums" and v.shape[1] > 1:  # another summation order over the keys
        half = v.shape[1] // 2
        return r(pv(probs[..., :half], v[:, :half]) + pv(probs[..., half:], v[:, half:]))
    return pv(probs, v)


def _masked_scores(q, k, case: Case, order: str, r=_keep, bias=None):
    """Scores (batch, heads, seqlen_q, seqlen_k) for expanded k, -inf where masked; also
    tanh(scores / softcap) for the softcap's derivative (None without softcap). ``bias``: the case's
    attn_bias tensor (drawn from the case when None), added to the scaled (capped, ALiBi-biased)
    scores when float, masking where False when bool."""
    scores = _scores(q, k, case.scale, order, r)
    capped = None
    if case.softcap:
        capped = r(torch.tanh(r(scores / case.softcap)))
        scores = r(case.softcap * capped)
    if case.alibi:
        scores = r(scores + alibi_bias(case, q.device, q.dtype))
    if case.attn_bias is not None:
        if bias is None:
            bias = attn_bias(case, q.device)
        if bias.dtype == torch.bool:
            scores = scores.masked_fill(~bias, float("-inf"))
        else:
            scores = r(scores + bias.to(q.dtype))
    ok = allowed(case, q.device)
    if ok is not None:
        scores = scores.masked_fill(~ok, float("-inf"))
    return scores, capped


def _softmax(scores, order: str, r=_keep):
    """softmax over keys; "exp2" as FlashAttention kernels do it: exp2 of log2(e)-scaled scores."""
    if order != "exp2":
        return r(torch.softmax(scores, dim=-1))
    scaled = r(scores * LOG2E)
    top = scaled.amax(dim=-1, keepdim=True).nan_to_num(0.0, neginf=0.0)
    e = r(torch.exp2(r(scaled - top)))
    return r(e / r(e.sum(dim=-1, keepdim=True)))


# How a 16-bit computation is emulated (float32 arithmetic, intermediates rounded where it stores them):
# "input": every intermediate in the input dtype, as plain PyTorch in fp16/bf16 (a matmul accumulates
#   in float32 and rounds its result; so does softmax);
# "fp32": float32 throughout, only the output rounded, as FlashAttention-style kernels accumulate;
# "fp32_p": the same, with the probabilities rounded to the input dtype before P·V (and, backward, P
#   and dS before their matmuls and O before D = rowsum(dO·O)), as those kernels feed tensor cores.
PRECISIONS = ("input", "fp32", "fp32_p")


def _rounders(dtype, precision: str):
    """(compute dtype, r for every intermediate, r for tensor-core operands) of an emulated computation."""
    if dtype not in (torch.float16, torch.bfloat16):
        return dtype, _keep, _keep

    def r(t):
        return t.to(dtype).to(torch.float32)

    if precision == "input":
        return torch.float32, r, r
    return torch.float32, _keep, (r if precision == "fp32_p" else _keep)


def _zero_masked_rows(probs, case: Case):
    empty = fully_masked_rows(case, probs.device)
    return probs if empty is None else probs.masked_fill(empty.unsqueeze(-1), 0.0)


def _expand(k, v, case: Case):
    """GQA/MQA: query head h reads key/value head h // (nheads / nheads_k)."""
    group = case.nheads // case.nheads_k
    return k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)


def _fill_masked_rows(out, v, case: Case, masked_rows: str):
    empty = fully_masked_rows(case, out.device)
    if empty is None or masked_rows == "zeros":
        return out
    fill = v.mean(dim=1, keepdim=True).expand_as(out) if masked_rows == "mean_v" else torch.full_like(
        out, float("nan"))
    return torch.where(_rows_bqh1(empty), fill, out)


def attention(q, k, v, case: Case, *, upcast: bool = True, masked_rows: str = "zeros",
              order: str = "scale_q", precision: str = "input", bias=None) -> torch.Tensor:
    """Attention over (batch, seqlen, heads, head_dim) inputs; returns (batch, seqlen_q, nheads, head_dim).

    masked_rows says what a query that may attend to no key returns: "zeros" (flash-attn), "mean_v"
    (a finite fill such as masked_fill(-1e9) makes the row uniform) or "nan" (softmax of all -inf).
    bias: the case's attn_bias tensor, to differentiate through it (drawn from the case when None).
    """
    if masked_rows not in MASKED_ROW_CONVENTIONS:
        raise ValueError(f"masked_rows must be one of {MASKED_ROW_CONVENTIONS}")
    dtype = torch.float64 if upcast else q.dtype
    compute, r, rt = _rounders(dtype, precision)
    q, k, v = (t.to(compute) for t in (q, k, v))
    k, v = _expand(k, v, case)
    if bias is not None and bias.is_floating_point():
        bias = r(bias.to(compute))
    scores, _ = _masked_scores(q, k, case, order, r, bias)
    probs = rt(_zero_masked_rows(_softmax(scores, order, r), case))
    return _fill_masked_rows(_weighted_sum(probs, v, order, r), v, case, masked_rows).to(dtype)


def flash_backward(q, k, v, dout, case: Case, *, masked_rows: str = "zeros", order: str = "scale_q",
                   precision: str = "input", with_dbias: bool = False):
    """dq, dk, dv in the inputs' dtype by FlashAttention's backward formulas: P recomputed as
    exp(S - LSE) from the row's log-sum-exp, and dS = P * (dP - D) with D = rowsum(dO * O) taken from
    the output, where autograd uses softmax(S) and rowsum(P * dP). Equal in exact arithmetic, they
    round differently (exp(S - LSE) loses ulp(LSE) when logits are large): both are valid orders.
    ``with_dbias``: also the gradient of a float attn_bias (dS summed over its broadcast dimensions)."""
    dtype = q.dtype
    compute, r, rt = _rounders(dtype, precision)
    q, k, v, dout = (t.to(compute) for t in (q, k, v, dout))
    b, sq, h, d = q.shape
    kx, vx = _expand(k, v, case)
    scores, capped = _masked_scores(q, kx, case, order, r)
    probs = r(_zero_masked_rows(torch.exp(r(scores - torch.logsumexp(scores, dim=-1, keepdim=True))), case))
    out = rt(_fill_masked_rows(_weighted_sum(rt(probs), vx, order, r), vx, case, masked_rows))
    delta = r((dout * out).sum(-1).transpose(1, 2).unsqueeze(-1))  # (b, h, sq, 1)
    dp = r(torch.einsum("bqhd,bkhd->bhqk", dout, vx))
    ds = r(probs * r(dp - delta))
    dbias = None
    if with_dbias:
        dbias = r(ds.sum(dim=[i for i, n in enumerate(case.bias_shape) if n == 1], keepdim=True))
    if capped is not None:
        ds = r(ds * r(1 - capped * capped))
    ds, pt = rt(ds), rt(probs)
    dq = r(r(torch.einsum("bhqk,bkhd->bqhd", ds, kx)) * case.scale)
    dkx = r(r(torch.einsum("bhqk,bqhd->bkhd", ds, q)) * case.scale)
    dvx = r(torch.einsum("bhqk,bqhd->bkhd", pt, dout))
    empty = fully_masked_rows(case, q.device)
    if empty is not None and masked_rows == "mean_v":  # those rows are mean(V): each key gets dO / seqlen_k
        dvx = dvx + (dout * _rows_bqh1(empty)).sum(dim=1, keepdim=True) / case.seqlen_k
    group = case.nheads // case.nheads_k
    dk, dv = (t.reshape(b, case.seqlen_k, case.nheads_k, group, d).sum(3) for t in (dkx, dvx))
    grads = tuple(t.to(dtype) for t in (dq, dk, dv))
    return (*grads, dbias.to(dtype)) if with_dbias else grads


def _reference_probs(q, kx, case: Case, masked_rows: str):
    """float64 probabilities, a masked row's as its declared value is made (uniform for mean_v)."""
    scores, _ = _masked_scores(q, kx, case, "scale_q")
    probs = _zero_masked_rows(torch.softmax(scores, dim=-1), case)
    empty = fully_masked_rows(case, q.device)
    if empty is not None and masked_rows == "mean_v":
        probs = torch.where(empty.unsqueeze(-1), 1.0 / case.seqlen_k, probs)
    return probs


def output_terms(probs, vx) -> torch.Tensor:
    """|P|·|V|: per output element, the sum of the absolute values of its terms, (b, sq, h, d)."""
    return torch.einsum("bhqk,bkhd->bqhd", probs, vx.abs())


def output_row_magnitudes(q, k, v, case: Case, masked_rows: str = "zeros") -> torch.Tensor:
    """term_magnitudes' output term, per query row (the largest over batch, heads and head dim)."""
    q, k, v = (t.detach().to(torch.float64) for t in (q, k, v))
    kx, vx = _expand(k, v, case)
    return output_terms(_reference_probs(q, kx, case, masked_rows), vx).amax(dim=(0, 2, 3))


def term_magnitudes(q, k, v, dout, case: Case, masked_rows: str = "zeros") -> tuple[float, float, float, float, float]:
    """For out, dq, dk, dv: the largest sum of absolute values of the terms that make one element
    (|P|·|V| for out; scale·|P∘(|dO|·|V| + |dO|·|O|)|·|K| for dq, where dP = dO·V and D = dO·O are
    themselves sums that cancel, its transpose with |Q| for dk; |P|ᵀ·|dO| for dv), in float64; and, last,
    that of the logits (scale·|Q|·|K|). Rounding errors scale with these, not with the result, which can
    cancel to ~0."""
    q, k, v, dout = (t.detach().to(torch.float64) for t in (q, k, v, dout))
    b, sq, h, d = q.shape
    kx, vx = _expand(k, v, case)
    probs = _reference_probs(q, kx, case, masked_rows)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, vx)
    delta = (dout.abs() * out.abs()).sum(-1).transpose(1, 2).unsqueeze(-1)
    ds = probs * (torch.einsum("bqhd,bkhd->bhqk", dout.abs(), vx.abs()) + delta)
    group = case.nheads // case.nheads_k

    def grouped(t):  # (b, sk, h, d) -> (b, sk, hk, d), summed over the query heads sharing a kv head
        return t.reshape(b, case.seqlen_k, case.nheads_k, group, d).sum(3)

    return (float(output_terms(probs, vx).max()),
            case.scale * float(torch.einsum("bhqk,bkhd->bqhd", ds, kx.abs()).max()),
            case.scale * float(grouped(torch.einsum("bhqk,bqhd->bkhd", ds, q.abs())).max()),
            float(grouped(torch.einsum("bhqk,bqhd->bkhd", probs, dout.abs())).max()),
            case.scale * float(torch.einsum("bqhd,bkhd->bhqk", q.abs(), kx.abs()).max()))
