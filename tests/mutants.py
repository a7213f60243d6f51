"""Deliberately broken backends, each with one planted bug, and the check (and property) meant to catch it.

They are test-only: nothing in the package knows about them. Each wraps a correct backend and changes
one thing, the way real kernels go wrong.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass

import torch

from conformance.backend import Backend
from conformance.backends import naive, tiled


@dataclass(frozen=True)
class Mutant:
    backend: Backend
    check: str  # the check meant to catch it
    prop: str  # the property of that check's verdict that must fail


def _naive_caps(**changes):
    """naive's declaration, less the KV-cache function a plain function does not have."""
    return dataclasses.replace(naive.BACKEND.capabilities, varlen=False, kvcache=False, paged_kv=False,
                               mixed_batch=False, **changes)


def _tiled_caps(**changes):
    """tiled's declaration, less the varlen and KV-cache functions a plain function does not have."""
    return dataclasses.replace(tiled.BACKEND.capabilities, varlen=False, kvcache=False, mixed_batch=False, **changes)


def _textbook(q, k, v, scale, causal, alignment, *, leak=0, fill=-1e9, max_subtract=True):
    """Attention in (batch, seqlen, heads, dim) with the knobs the mutants below turn."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    if causal:
        sq, sk = scores.shape[-2:]
        offset = sk - sq if alignment == "bottom_right" else 0
        mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(offset + leak)
        if fill != -math.inf:
            fill = max(fill, torch.finfo(scores.dtype).min)
        scores = scores.masked_fill(~mask, fill)
    if max_subtract:
        weights = torch.softmax(scores, dim=-1)
    else:
        e = torch.exp(scores.float())
        weights = (e / e.sum(dim=-1, keepdim=True)).to(scores.dtype)
    return torch.matmul(weights, v).transpose(1, 2)


def _scale(q, softmax_scale):
    return softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5


def wrong_scale(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, causal_alignment="bottom_right"):
    scale = softmax_scale if softmax_scale is not None else 1.0 / q.shape[-1]  # 1/d instead of 1/sqrt(d)
    return naive.attention(q, k, v, softmax_scale=scale, causal=causal, causal_alignment=causal_alignment)


def scale_ignored(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, causal_alignment="bottom_right"):
    return naive.attention(q, k, v, causal=causal, causal_alignment=causal_alignment)


def causal_leak(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, causal_alignment="bottom_right"):
    return _textbook(q, k, v, _scale(q, softmax_scale), causal, causal_alignment, leak=1)


def alignment_confused(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
    """Declares flash-attn's bottom-right alignment, implements SDPA's top-left."""
    return naive.attention(q, k, v, softmax_scale=softmax_scale, causal=causal, causal_alignment="top_left")


def dropped_tail_block(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, causal_alignment="bottom_right"):
    """A tiled loop whose bound forgets the last, partial key block."""
    full = (k.shape[1] // 64) * 64 or k.shape[1]
    return tiled.attention(q, k[:, :full], v[:, :full], softmax_scale=softmax_scale, causal=causal,
                           causal_alignment=causal_alignment)


def wrong_gqa_mapping(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, causal_alignment="bottom_right"):
    """Query head h reads key/value head h % nheads_k instead of h // (nheads / nheads_k)."""
    group = q.shape[2] // k.shape[2]
    k, v = k.repeat(1, 1, group, 1), v.repeat(1, 1, group, 1)
    return naive.attention(q, k, v, softmax_scale=softmax_scale, causal=causal, causal_alignment=causal_alignment)


def no_max_subtraction(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, causal_alignment="bottom_right"):
    return _textbook(q, k, v, _scale(q, softmax_scale), causal, causal_alignment, max_subtract=False)


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient, as a backward kernel off by a factor would."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def gradient_off(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, causal_alignment="bottom_right"):
    """dk is 0.5% too large; the forward is exact."""
    return naive.attention(q, _ScaleGradient.apply(k, 1.005), v, softmax_scale=softmax_scale, causal=causal,
                           causal_alignment=causal_alignment)


def batch_mixed(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, causal_alignment="bottom_right"):
    """Batch item b attends to the keys and values of item b-1."""
    return naive.attention(q, k.roll(1, dims=0), v.roll(1, dims=0), softmax_scale=softmax_scale, causal=causal,
                           causal_alignment=causal_alignment)


def stride_bug(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, causal_alignment="bottom_right"):
    """Reads each input's storage as if it were contiguous: right only for contiguous inputs."""
    def as_contiguous(t):
        stride = torch.empty(t.shape, device="meta").stride()
        return torch.as_strided(t, t.shape, stride, t.storage_offset())
    return naive.attention(*(as_contiguous(t) for t in (q, k, v)), softmax_scale=softmax_scale, causal=causal,
                           causal_alignment=causal_alignment)


def nan_masked_rows(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, causal_alignment="bottom_right"):
    """Declares zeros for fully masked rows (flash-attn's convention) but returns softmax(-inf...) = NaN."""
    return _textbook(q, k, v, _scale(q, softmax_scale), causal, causal_alignment, fill=-math.inf)


_block_sizes = itertools.cycle((16, 32, 64))


def nondeterministic(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, causal_alignment="bottom_right"):
    """Changes its key block size from call to call (as a kernel whose split count depends on what else
    runs would): same math, different rounding."""
    return tiled.attention(q, k, v, softmax_scale=softmax_scale, causal=causal, causal_alignment=causal_alignment,
                           block_k=next(_block_sizes))


def modifies_input(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, causal_alignment="bottom_right"):
    """Pre-scales q in place to save a multiplication."""
    with torch.no_grad():
        q.mul_(_scale(q, softmax_scale))
    return naive.attention(q, k, v, softmax_scale=1.0, causal=causal, causal_alignment=causal_alignment)


_cache: dict = {}


def stale_cache(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, causal_alignment="bottom_right"):
    """Caches its result by shape and arguments, not by the data."""
    key = (tuple(q.shape), tuple(k.shape), q.dtype, q.device, softmax_scale, causal, causal_alignment)
    if key not in _cache:
        _cache[key] = naive.attention(q, k, v, softmax_scale=softmax_scale, causal=causal,
                                      causal_alignment=causal_alignment)
    return _cache[key]


def float32_output(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, causal_alignment="bottom_right"):
    """Returns float32 whatever the input dtype."""
    return naive.attention(q.float(), k.float(), v.float(), softmax_scale=softmax_scale, causal=causal,
                           causal_alignment=causal_alignment)


def window_off_by_one(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), **kw):
    """The left edge of the window admits one key too many."""
    left, right = window_size
    return tiled.attention(q, k, v, softmax_scale=softmax_scale, causal=causal,
                           window_size=(left + 1 if left >= 0 else left, right), **kw)


def alibi_slope_sign(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, alibi_slopes=None, **kw):
    """Adds the ALiBi distance penalty instead of subtracting it."""
    return tiled.attention(q, k, v, softmax_scale=softmax_scale, causal=causal,
                           alibi_slopes=None if alibi_slopes is None else -alibi_slopes, **kw)


def softcap_unscaled(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, softcap=0.0, **kw):
    """Caps the raw scores, then scales: scale * softcap * tanh(q.k / softcap) instead of
    softcap * tanh(scale * q.k / softcap)."""
    scale = _scale(q, softmax_scale)
    return tiled.attention(q, k, v, softmax_scale=scale, causal=causal, softcap=softcap * scale, **kw)


def varlen_leak(q, k, v, cu_seqlens_q, cu_seqlens_k, *args, **kwargs):
    """Each sequence's keys run one token into the next sequence (an off-by-one end offset)."""
    ends = cu_seqlens_k.clone()
    ends[1:-1] += 1
    outs = []
    bq, bk = cu_seqlens_q.tolist(), ends.tolist()
    starts = cu_seqlens_k.tolist()
    for i in range(len(bq) - 1):
        outs.append(tiled.attention(q[None, bq[i]: bq[i + 1]], k[None, starts[i]: bk[i + 1]],
                                    v[None, starts[i]: bk[i + 1]], softmax_scale=kwargs.get("softmax_scale"))[0])
    return torch.cat(outs)


def kvcache_ignores_lengths(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, **kwargs):
    """Writes the new tokens, then attends to the whole cache capacity, stale entries included."""
    tiled.kvcache_attention(q, k_cache, v_cache, k=k, v=v, cache_seqlens=cache_seqlens, **kwargs)
    return tiled.attention(q, k_cache, v_cache, softmax_scale=kwargs.get("softmax_scale"))


def kvcache_no_write(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, **kwargs):
    """Attends correctly but leaves the caches unchanged."""
    return tiled.kvcache_attention(q, k_cache.clone(), v_cache.clone(), k=k, v=v, cache_seqlens=cache_seqlens,
                                   **kwargs)


def nondeterministic_backward(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, deterministic=False, **kw):
    """Claims a deterministic backward, but its block size (so its summation order) changes per call."""
    return tiled.attention(q, k, v, softmax_scale=softmax_scale, causal=causal, block_k=next(_block_sizes), **kw)


def _mutant(fn, check, prop, caps, **fns):
    return Mutant(Backend(name=fn.__name__.replace("_", "-"), fn=fn, capabilities=caps, **fns), check, prop)


def _tiled_variant(name, check, prop, **fns):
    """A copy of the tiled backend with one of its functions replaced."""
    backend = dataclasses.replace(tiled.BACKEND, name=name, **fns)
    return Mutant(backend, check, prop)


MUTANTS = [
    _mutant(wrong_scale, "forward", "forward", _naive_caps()),
    _mutant(scale_ignored, "forward", "forward", _naive_caps()),
    _mutant(causal_leak, "causal", "future-independence", _naive_caps()),
    _mutant(alignment_confused, "causal", "causal-reference", _naive_caps(causal=("bottom_right",))),
    _mutant(dropped_tail_block, "forward", "forward", _tiled_caps()),
    _mutant(wrong_gqa_mapping, "forward", "forward", _naive_caps()),
    _mutant(no_max_subtraction, "forward", "forward", _naive_caps()),
    _mutant(gradient_off, "gradients", "dk", _naive_caps()),
    _mutant(batch_mixed, "forward", "forward", _naive_caps()),
    _mutant(stride_bug, "forward", "forward", _naive_caps()),
    _mutant(nan_masked_rows, "causal", "causal-reference", _naive_caps(masked_rows="zeros")),
    _mutant(nondeterministic, "sanity", "deterministic", _tiled_caps()),
    _mutant(modifies_input, "sanity", "inputs-unmodified", _naive_caps()),
    _mutant(stale_cache, "sanity", "fresh-output", _naive_caps()),
    _mutant(float32_output, "forward", "contract", _naive_caps()),
    _mutant(window_off_by_one, "window", "outside-window-independence", _tiled_caps()),
    _mutant(alibi_slope_sign, "alibi", "alibi-reference", _tiled_caps()),
    _mutant(softcap_unscaled, "softcap", "softcap-reference", _tiled_caps()),
    _tiled_variant("varlen-leak", "varlen", "sequence-isolation", varlen_fn=varlen_leak),
    _tiled_variant("kvcache-ignores-lengths", "kvcache", "kvcache-reference", kvcache_fn=kvcache_ignores_lengths),
    _tiled_variant("kvcache-no-write", "kvcache", "cache-update", kvcache_fn=kvcache_no_write),
    _mutant(nondeterministic_backward, "determinism", "backward-deterministic", _tiled_caps()),
]


def half_accumulator(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, causal_alignment="bottom_right",
                     block_k=64):
    """An online-softmax kernel whose output accumulator is in the input dtype (the classic
    ``acc = tl.zeros(..., dtype=tl.float16)`` slip): scores, max and sum in float32, but every block's
    rescaled accumulator is rounded to fp16/bf16. Exact in float32/float64; in 16-bit dtypes its error
    grows with the number of key blocks (about 5x a float32-accumulating kernel's at 4096 keys)."""
    dtype = q.dtype
    acc_dtype = dtype if dtype in (torch.float16, torch.bfloat16) else torch.float64
    qh, kh, vh = (t.transpose(1, 2).to(torch.float64 if dtype == torch.float64 else torch.float32)
                  for t in (q, k, v))
    group = qh.shape[1] // kh.shape[1]
    kh, vh = kh.repeat_interleave(group, dim=1), vh.repeat_interleave(group, dim=1)
    scale = _scale(q, softmax_scale)
    sq, sk = qh.shape[-2], kh.shape[-2]
    offset = sk - sq if causal_alignment == "bottom_right" else 0
    m = torch.full(qh.shape[:-1], -math.inf, dtype=qh.dtype, device=q.device)
    l = torch.zeros_like(m)
    acc = torch.zeros(qh.shape, dtype=acc_dtype, device=q.device)
    for c0 in range(0, sk, block_k):
        s = torch.matmul(qh, kh[..., c0:c0 + block_k, :].transpose(-2, -1)) * scale
        if causal:
            i = torch.arange(sq, device=q.device).unsqueeze(1) + offset
            j = torch.arange(c0, c0 + s.shape[-1], device=q.device).unsqueeze(0)
            s = s.masked_fill(j > i, -math.inf)
        m_new = torch.maximum(m, s.amax(dim=-1))
        m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        p = torch.exp(s - m_safe.unsqueeze(-1))
        alpha = torch.exp(m - m_safe)
        l = l * alpha + p.sum(dim=-1)
        acc = (acc.to(qh.dtype) * alpha.unsqueeze(-1) + torch.matmul(p.to(dtype).to(qh.dtype), vh[..., c0:c0 + block_k, :])
               ).to(acc_dtype)
        m = m_new
    out = torch.where((l > 0).unsqueeze(-1), acc.to(qh.dtype) / l.clamp_min(1e-30).unsqueeze(-1), 0.0)
    return out.to(dtype).transpose(1, 2)


# Caught only by long half-precision cases (the standard tier's, N >= 4096): kept out of MUTANTS, whose
# self-tests run the quick grid and the fuzzer's short cases; tests/test_grid.py runs it.
PRECISION_MUTANTS = [
    _mutant(half_accumulator, "forward", "forward",
            _tiled_caps(backward=False, window=False, softcap=False, alibi=False)),
]


# -- planted bugs for the diagnosis (conformance/diagnosis.py) ---------------------------------------
# Each is named by one hypothesis of the diagnosis (tests/test_diagnosis.py). They are not in MUTANTS:
# several break every case of their check, which proves the diagnosis but not a check's grid.

def scale_forgotten(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, causal_alignment="bottom_right"):
    """Never scales the scores (softmax_scale=1.0), the issue's first example."""
    return naive.attention(q, k, v, softmax_scale=1.0, causal=causal, causal_alignment=causal_alignment)


def scale_inverted(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, causal_alignment="bottom_right"):
    """Multiplies the scores by sqrt(head_dim) where it should divide."""
    return naive.attention(q, k, v, softmax_scale=1.0 / _scale(q, softmax_scale), causal=causal,
                           causal_alignment=causal_alignment)


def causal_dropped(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, causal_alignment="bottom_right"):
    """Accepts causal=True and ignores it."""
    return naive.attention(q, k, v, softmax_scale=softmax_scale)


def causal_always(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, causal_alignment="bottom_right"):
    """A decoder-only kernel: masks the future whatever causal says."""
    return naive.attention(q, k, v, softmax_scale=softmax_scale, causal=True, causal_alignment=causal_alignment)


def reads_bhsd(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, causal_alignment="bottom_right"):
    """Written for (batch, heads, seqlen, head_dim) inputs: attends across the heads axis."""
    out = naive.attention(*(t.transpose(1, 2) for t in (q, k, v)), softmax_scale=_scale(q, softmax_scale),
                          causal=causal, causal_alignment=causal_alignment)
    return out.transpose(1, 2)


def _tail(n, block=64):
    return n // block * block


def dropped_tail_rows(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, causal_alignment="bottom_right"):
    """A tiled loop over query blocks that forgets the last, partial one: its rows stay zero."""
    out = tiled.attention(q, k, v, softmax_scale=softmax_scale, causal=causal, causal_alignment=causal_alignment)
    full = _tail(q.shape[1])
    if full:
        out = out.clone()
        out[:, full:] = 0
    return out


def stale_tail_rows(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, causal_alignment="bottom_right"):
    """The last, partial query block is written from the previous block's results (rows r - 64)."""
    out = tiled.attention(q, k, v, softmax_scale=softmax_scale, causal=causal, causal_alignment=causal_alignment)
    full = _tail(q.shape[1])
    if full:
        out = out.clone()
        out[:, full:] = out[:, full - 64: full - 64 + q.shape[1] - full].clone()
    return out


DIAGNOSIS_MUTANTS = [
    _mutant(scale_forgotten, "forward", "forward", _naive_caps()),
    _mutant(scale_inverted, "forward", "forward", _naive_caps()),
    _mutant(causal_dropped, "causal", "causal-reference", _naive_caps()),
    _mutant(causal_always, "forward", "forward", _naive_caps()),
    _mutant(reads_bhsd, "forward", "forward", _naive_caps()),
    _mutant(dropped_tail_rows, "forward", "forward", _tiled_caps()),
    _mutant(stale_tail_rows, "forward", "forward", _tiled_caps()),
    # the declared convention for fully masked rows is not the one returned
    Mutant(Backend(name="mean-v-masked-rows", fn=naive.attention, capabilities=_naive_caps(masked_rows="zeros")),
           "causal", "causal-reference"),
    Mutant(Backend(name="zeros-masked-rows", fn=tiled.attention, capabilities=_tiled_caps(masked_rows="mean_v")),
           "causal", "causal-reference"),
]


# -- attn_bias (conformance/checks/attn_bias.py) -----------------------------------------------------

def bias_wrong_broadcast(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, causal_alignment="bottom_right",
                         attn_bias=None):
    """A per-batch mask or bias (batch, 1, ...) broadcast over the wrong dimension: head h gets the one
    of batch item h % batch, the same for every batch item."""
    if attn_bias is not None and attn_bias.shape[0] > 1 and attn_bias.shape[1] == 1:
        heads = torch.arange(q.shape[2], device=q.device) % attn_bias.shape[0]
        attn_bias = attn_bias[:, 0][heads].unsqueeze(0)
    return naive.attention(q, k, v, softmax_scale=softmax_scale, causal=causal, causal_alignment=causal_alignment,
                           attn_bias=attn_bias)


def bias_before_scale(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, causal_alignment="bottom_right",
                      attn_bias=None):
    """Adds a float bias to the raw scores, then scales: (q.k + bias) * scale instead of q.k * scale + bias."""
    if attn_bias is not None and attn_bias.is_floating_point():
        attn_bias = attn_bias * _scale(q, softmax_scale)
    return naive.attention(q, k, v, softmax_scale=softmax_scale, causal=causal, causal_alignment=causal_alignment,
                           attn_bias=attn_bias)


def bool_mask_added(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, causal_alignment="bottom_right",
                    attn_bias=None):
    """Treats every attn_bias as additive: a boolean keep-mask adds 1 where it keeps and 0 where it masks."""
    if attn_bias is not None and attn_bias.dtype == torch.bool:
        attn_bias = attn_bias.to(q.dtype)
    return naive.attention(q, k, v, softmax_scale=softmax_scale, causal=causal, causal_alignment=causal_alignment,
                           attn_bias=attn_bias)


def bias_after_max(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, causal_alignment="bottom_right",
                   attn_bias=None):
    """Takes the softmax's max over the scaled scores before adding the bias: exp(s + bias - max(s))
    overflows (or underflows to 0/0) for a bias far beyond exp's range."""
    if attn_bias is None or attn_bias.dtype == torch.bool:
        return naive.attention(q, k, v, softmax_scale=softmax_scale, causal=causal, causal_alignment=causal_alignment,
                               attn_bias=attn_bias)
    dtype = q.dtype
    qh, kh, vh = (t.transpose(1, 2).float() for t in (q, k, v))
    group = qh.shape[1] // kh.shape[1]
    kh, vh = kh.repeat_interleave(group, dim=1), vh.repeat_interleave(group, dim=1)
    s = torch.matmul(qh, kh.transpose(-2, -1)) * _scale(q, softmax_scale)
    if causal:
        sq, sk = s.shape[-2:]
        offset = sk - sq if causal_alignment == "bottom_right" else 0
        s = s.masked_fill(~torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(offset), -math.inf)
    e = torch.exp(s + attn_bias.float() - s.amax(dim=-1, keepdim=True))
    return torch.matmul(e / e.sum(dim=-1, keepdim=True), vh).transpose(1, 2).to(dtype)


def bias_detached(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, causal_alignment="bottom_right",
                  attn_bias=None):
    """Declares bias_grad but treats the bias as a constant: no gradient reaches it."""
    return naive.attention(q, k, v, softmax_scale=softmax_scale, causal=causal, causal_alignment=causal_alignment,
                           attn_bias=None if attn_bias is None else attn_bias.detach())


MUTANTS += [
    _mutant(bias_wrong_broadcast, "attn_bias", "attn-bias-reference", _naive_caps()),
    _mutant(bias_before_scale, "attn_bias", "attn-bias-reference", _naive_caps()),
    _mutant(bool_mask_added, "attn_bias", "attn-bias-reference", _naive_caps()),
    _mutant(bias_after_max, "attn_bias", "attn-bias-reference", _naive_caps(bias_grad=False)),
    _mutant(bias_detached, "attn_bias", "dbias", _naive_caps()),
]


def _declares_attn_bias_only_if_it_takes_it(m: Mutant) -> Mutant:
    """The mutants above wrap naive or tiled, whose declarations now include attn_bias and (naive)
    dropout; one whose own signature takes no attn_bias (nor passes **kwargs on) does not declare it,
    and none passes dropout_p on."""
    import inspect

    params = inspect.signature(m.backend.fn).parameters.values()
    takes = any(p.name == "attn_bias" or p.kind is p.VAR_KEYWORD for p in params)
    caps = dataclasses.replace(m.backend.capabilities, dropout=False,
                               **({} if takes else {"attn_bias": False, "bias_grad": False}))
    return dataclasses.replace(m, backend=dataclasses.replace(m.backend, capabilities=caps))


MUTANTS = [_declares_attn_bias_only_if_it_takes_it(m) for m in MUTANTS]
DIAGNOSIS_MUTANTS = [_declares_attn_bias_only_if_it_takes_it(m) for m in DIAGNOSIS_MUTANTS]
PRECISION_MUTANTS = [_declares_attn_bias_only_if_it_takes_it(m) for m in PRECISION_MUTANTS]


# -- paged KV cache (conformance/checks/kvcache.py) ---------------------------------------------------

def paged_table_in_order(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, block_table=None, **kwargs):
    """Reads (and writes) a paged cache's blocks in order, batch item b's block i at b * blocks + i,
    instead of through the block table."""
    if block_table is not None:
        block_table = torch.arange(block_table.numel(), device=block_table.device,
                                   dtype=block_table.dtype).view_as(block_table)
    return tiled.kvcache_attention(q, k_cache, v_cache, k=k, v=v, cache_seqlens=cache_seqlens, block_table=block_table,
                                   **kwargs)


def paged_tail_past_length(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, block_table=None, **kwargs):
    """Writes the new tokens where they belong, then attends to whole blocks: the last, partial block's
    tail past the cache length (stale entries) is read too."""
    out = tiled.kvcache_attention(q, k_cache, v_cache, k=k, v=v, cache_seqlens=cache_seqlens, block_table=block_table,
                                  **kwargs)
    if block_table is None:
        return out
    page, new = k_cache.shape[1], k.shape[1]
    outs = []
    for b, n in enumerate(cache_seqlens.tolist()):
        end = -(-(n + new) // page) * page
        keys, values = (c[block_table[b].long()].flatten(0, 1)[None, :end] for c in (k_cache, v_cache))
        outs.append(tiled.attention(q[b: b + 1], keys, values, **kwargs))
    return torch.cat(outs)


MUTANTS += [
    _tiled_variant("paged-table-in-order", "kvcache", "kvcache-reference", kvcache_fn=paged_table_in_order),
    _tiled_variant("paged-tail-past-length", "kvcache", "kvcache-reference", kvcache_fn=paged_tail_past_length),
]


# -- dropout (conformance/checks/dropout.py) ----------------------------------------------------------

def _with_dropout(q, k, v, softmax_scale, causal, causal_alignment, drop):
    """naive's attention with ``drop(weights)`` applied to the probabilities."""
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    group = qh.shape[1] // kh.shape[1]
    kh, vh = kh.repeat_interleave(group, dim=1), vh.repeat_interleave(group, dim=1)
    scores = torch.matmul(qh, kh.transpose(-2, -1)) * _scale(q, softmax_scale)
    if causal:
        sq, sk = scores.shape[-2:]
        offset = sk - sq if causal_alignment == "bottom_right" else 0
        keep = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(offset)
        scores = scores.masked_fill(~keep, max(-1e9, torch.finfo(scores.dtype).min))
    return torch.matmul(drop(torch.softmax(scores, dim=-1)), vh).transpose(1, 2)


def dropout_no_rescale(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, causal_alignment="bottom_right"):
    """Drops probabilities but forgets the 1/(1 - p) rescale of the kept ones."""
    return _with_dropout(q, k, v, softmax_scale, causal, causal_alignment,
                         lambda w: torch.nn.functional.dropout(w, dropout_p) * (1 - dropout_p))


def dropout_at_zero(q, k, v, dropout_p=None, softmax_scale=None, causal=False, causal_alignment="bottom_right"):
    """Takes a dropout_p argument as training mode: drops with at least p = 0.1 even at dropout_p=0.0."""
    p = 0.0 if dropout_p is None else max(dropout_p, 0.1)
    return _with_dropout(q, k, v, softmax_scale, causal, causal_alignment,
                         lambda w: torch.nn.functional.dropout(w, p))


def dropout_fixed_mask(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, causal_alignment="bottom_right"):
    """Draws its dropout mask from a generator of its own, seeded the same on every call: the seed is ignored."""
    def drop(w):
        if not dropout_p:
            return w
        gen = torch.Generator(device=w.device).manual_seed(1234)
        keep = torch.rand(w.shape, generator=gen, device=w.device) >= dropout_p
        return w * keep / (1 - dropout_p)
    return _with_dropout(q, k, v, softmax_scale, causal, causal_alignment, drop)


def dropout_backward_other_mask(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                                causal_alignment="bottom_right"):
    """The forward's value is right, but its backward drops with another mask (a fresh draw, as a backward
    kernel that does not replay the forward's random numbers)."""
    def drop(w):
        first = torch.nn.functional.dropout(w, dropout_p)
        second = torch.nn.functional.dropout(w, dropout_p)
        return first.detach() + (second - second.detach())
    return _with_dropout(q, k, v, softmax_scale, causal, causal_alignment, drop)


MUTANTS += [
    _mutant(dropout_backward_other_mask, "dropout", "dropout-gradients", _naive_caps(attn_bias=False, bias_grad=False)),
    _mutant(dropout_no_rescale, "dropout", "dropout-mean", _naive_caps(attn_bias=False, bias_grad=False)),
    _mutant(dropout_at_zero, "dropout", "dropout-zero", _naive_caps(attn_bias=False, bias_grad=False)),
    _mutant(dropout_fixed_mask, "dropout", "dropout-varies", _naive_caps(attn_bias=False, bias_grad=False)),
]


class _WritesQInBackward(torch.autograd.Function):
    """Passes the output through; its backward adds to q's storage (as a kernel writing dq into q)."""

    @staticmethod
    def forward(ctx, q, out):
        ctx.q = q
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        ctx.q.data.add_(1.0)
        return None, grad


def backward_writes_q(q, k, v, **kwargs):
    """Right forward; its backward writes into the caller's q."""
    out = naive.attention(q, k, v, **kwargs)
    return _WritesQInBackward.apply(q, out) if out.requires_grad else out


MUTANTS += [_mutant(backward_writes_q, "gradients", "inputs-unmodified", _naive_caps(attn_bias=False, bias_grad=False))]


# -- paged KV cache block sizes (conformance/checks/kvcache.py) ---------------------------------------

def paged_right_for_some_block_sizes(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, block_table=None,
                                     **kwargs):
    """Right for blocks of 16, 32 and 256 tokens only (a kernel specialised for the block sizes its author
    tried); for other sizes it walks the cache's blocks in order, not through the table."""
    if block_table is not None and k_cache.shape[1] not in (16, 32, 256):
        return paged_table_in_order(q, k_cache, v_cache, k=k, v=v, cache_seqlens=cache_seqlens,
                                    block_table=block_table, **kwargs)
    return tiled.kvcache_attention(q, k_cache, v_cache, k=k, v=v, cache_seqlens=cache_seqlens, block_table=block_table,
                                   **kwargs)


def paged_varlen_right_for_some_block_sizes(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                            block_table=None, **kwargs):
    """The same kernel's variable-length entry (a mixed prefill and decode batch over a paged cache)."""
    if block_table is not None and k.shape[1] not in (16, 32, 256):
        block_table = torch.arange(block_table.numel(), device=block_table.device,
                                   dtype=block_table.dtype).view_as(block_table)
    return tiled.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  block_table=block_table, **kwargs)


MUTANTS += [_tiled_variant("paged-right-for-some-block-sizes", "kvcache", "kvcache-reference",
                           kvcache_fn=paged_right_for_some_block_sizes,
                           varlen_fn=paged_varlen_right_for_some_block_sizes)]


# -- mixed prefill and decode batches (conformance/checks/kvcache.py, case feature mixed_batch) ----------

def mixed_batch_global_offset(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_table=None,
                              causal=False, **kwargs):
    """Aligns every sequence's causal mask by the batch's longest key and query counts (max_seqlen_k -
    max_seqlen_q), not by its own: right for a varlen batch (as many keys as queries in every sequence) and
    for rows that all add the same number of tokens; a decode row beside a prefill row loses its last keys."""
    bq, bk = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs = []
    for i in range(len(bq) - 1):
        lq, lk = bq[i + 1] - bq[i], bk[i + 1] - bk[i]
        if block_table is None:
            keys, values = k[None, bk[i]: bk[i + 1]], v[None, bk[i]: bk[i + 1]]
        else:
            keys, values = (c[block_table[i].long()].flatten(0, 1)[None, :lk] for c in (k, v))
        keep = None
        if causal:
            keep = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(max_seqlen_k - max_seqlen_q)[None, None]
        outs.append(tiled.attention(q[None, bq[i]: bq[i + 1]], keys, values, attn_bias=keep, **kwargs)[0])
    return torch.cat(outs)


MUTANTS += [_tiled_variant("mixed-batch-global-offset", "kvcache", "kvcache-reference",
                           varlen_fn=mixed_batch_global_offset)]


# -- dropout and attn_bias: the holes a hostile review found (each stayed green with the default fuzz) ---

def _grad_call(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def dropout_rate_off_without_grad(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                                  causal_alignment="bottom_right"):
    """On calls where no input requires grad (an inference path with its own rate arithmetic), drops at
    p/8, rescaled by 1/(1 - p/8): unbiased, so the mean converges, but its variance is a tenth."""
    p = dropout_p if _grad_call(q, k, v) else dropout_p / 8
    return _with_dropout(q, k, v, softmax_scale, causal, causal_alignment, lambda w: torch.nn.functional.dropout(w, p))


def dropout_rate_off_long_keys(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                               causal_alignment="bottom_right"):
    """On calls that require grad and have more keys than the head dim, drops at p/8 (rescaled)."""
    p = dropout_p / 8 if _grad_call(q, k, v) and k.shape[1] > q.shape[-1] else dropout_p
    return _with_dropout(q, k, v, softmax_scale, causal, causal_alignment, lambda w: torch.nn.functional.dropout(w, p))


def dropout_rows_share_mask(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, causal_alignment="bottom_right"):
    """One dropout mask per (batch item, head), shared by all its query rows: each element's mean and
    variance are right, the rows' masks are not independent."""
    def drop(w):
        if not dropout_p:
            return w
        keep = torch.rand((*w.shape[:2], 1, w.shape[-1]), device=w.device) >= dropout_p
        return w * keep / (1 - dropout_p)
    return _with_dropout(q, k, v, softmax_scale, causal, causal_alignment, drop)


def dropout_ignores_bias(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, causal_alignment="bottom_right",
                         attn_bias=None):
    """Ignores attn_bias on calls with dropout_p > 0 (a dropout kernel without the bias operand)."""
    return naive.attention(q, k, v, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal,
                           causal_alignment=causal_alignment, attn_bias=None if dropout_p else attn_bias)


def bias_ignored_with_softcap(q, k, v, softcap=0.0, attn_bias=None, **kwargs):
    """Ignores attn_bias when softcap is passed too (a soft-capping kernel without the bias operand)."""
    return tiled.attention(q, k, v, softcap=softcap, attn_bias=None if softcap else attn_bias, **kwargs)


def bias_ignored_with_window(q, k, v, window_size=(-1, -1), attn_bias=None, **kwargs):
    """Ignores attn_bias when a sliding window is passed too."""
    windowed = tuple(window_size) != (-1, -1)
    return tiled.attention(q, k, v, window_size=window_size, attn_bias=None if windowed else attn_bias, **kwargs)


def bias_ignored_with_alibi(q, k, v, alibi_slopes=None, attn_bias=None, **kwargs):
    """Ignores attn_bias when ALiBi slopes are passed too."""
    return tiled.attention(q, k, v, alibi_slopes=alibi_slopes, attn_bias=None if alibi_slopes is not None else attn_bias,
                           **kwargs)


def bias_head_broadcast_ignored(q, k, v, attn_bias=None, **kwargs):
    """Ignores a bias that spans heads but broadcasts over queries, shaped (batch or 1, nheads, 1, seqlen_k)."""
    if attn_bias is not None and attn_bias.shape[1] > 1 and attn_bias.shape[2] == 1:
        attn_bias = None
    return naive.attention(q, k, v, attn_bias=attn_bias, **kwargs)


class _WritesBiasInBackward(torch.autograd.Function):
    """Passes the output through; its backward writes into the bias's storage (as a kernel writing dbias
    into the caller's attn_bias)."""

    @staticmethod
    def forward(ctx, bias, out):
        ctx.bias = bias
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        data = ctx.bias.data
        data.logical_not_() if data.dtype == torch.bool else data.add_(1.0)
        return None, grad


def backward_writes_bias(q, k, v, attn_bias=None, **kwargs):
    """Right forward; its backward writes into the caller's attn_bias."""
    out = naive.attention(q, k, v, attn_bias=attn_bias, **kwargs)
    return _WritesBiasInBackward.apply(attn_bias, out) if out.requires_grad and attn_bias is not None else out


def bias_read_as_contiguous(q, k, v, attn_bias=None, **kwargs):
    """Reads attn_bias's memory as if the tensor were contiguous (ignoring its strides), wrapping around
    where a stride-0 (expanded) tensor's memory is shorter than its shape."""
    if attn_bias is not None and not attn_bias.is_contiguous():
        size = attn_bias.untyped_storage().nbytes() // attn_bias.element_size()
        flat = attn_bias.as_strided((size,), (1,), 0)
        index = (attn_bias.storage_offset() + torch.arange(attn_bias.numel(), device=flat.device)) % size
        attn_bias = flat[index].view(attn_bias.shape)
    return naive.attention(q, k, v, attn_bias=attn_bias, **kwargs)


_PLAIN = dict(attn_bias=False, bias_grad=False)
MUTANTS += [
    _mutant(dropout_rate_off_without_grad, "dropout", "dropout-variance", _naive_caps(**_PLAIN)),
    _mutant(dropout_rate_off_long_keys, "dropout", "dropout-mask", _naive_caps(**_PLAIN)),
    _mutant(dropout_rows_share_mask, "dropout", "dropout-rows-independent", _naive_caps(**_PLAIN)),
    _mutant(dropout_ignores_bias, "dropout", "dropout-mean", _naive_caps()),
    _mutant(bias_ignored_with_softcap, "attn_bias", "attn-bias-reference", _tiled_caps(dropout=False)),
    _mutant(bias_ignored_with_window, "attn_bias", "attn-bias-reference", _tiled_caps(dropout=False)),
    _mutant(bias_ignored_with_alibi, "attn_bias", "attn-bias-reference", _tiled_caps(dropout=False)),
    _mutant(bias_head_broadcast_ignored, "attn_bias", "attn-bias-reference", _naive_caps(dropout=False)),
    _mutant(backward_writes_bias, "attn_bias", "inputs-unmodified", _naive_caps(dropout=False)),
    _mutant(bias_read_as_contiguous, "attn_bias", "attn-bias-layout", _naive_caps(dropout=False)),
]
