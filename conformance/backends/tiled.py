"""`tiled`: the FlashAttention algorithm in plain PyTorch, written to be read.

Forward: for each block of queries, walk the blocks of keys/values with the online softmax (running
max m, running sum l, an accumulator rescaled whenever m grows), so the (seqlen_q, seqlen_k) matrix is
never materialised: memory grows linearly with the sequence. Blocks that the mask hides entirely are
skipped. The log-sum-exp of each row is saved for the backward, which recomputes every block's
probabilities from it instead of storing them (FlashAttention's recomputation).

Masks are computed here from the arguments, independently of the suite's reference. Arithmetic is in
float32 for 16-bit inputs (as FlashAttention accumulates) and in float64 for float64 inputs.
"""

from __future__ import annotations

import math

import torch

from conformance.backend import Backend
from conformance.backends.kvcache_adapter import kvcache_with, varlen_with
from conformance.capabilities import Capabilities


class _Mask:
    """Which (query, key) pairs may interact, from causal/window arguments in flash-attn's sense."""

    def __init__(self, seqlen_q, seqlen_k, causal, alignment, window, device):
        self.offset = seqlen_k - seqlen_q if alignment == "bottom_right" else 0
        left, right = window
        if causal:
            right = 0
        self.left, self.right, self.device = left, right, device

    def block(self, r0, r1, c0, c1):
        """(r1-r0, c1-c0) bool for this block, or None when nothing is masked, or False when all is."""
        if self.left < 0 and self.right < 0:
            return None
        diag_lo, diag_hi = r0 + self.offset, r1 - 1 + self.offset
        if (self.right >= 0 and c0 > diag_hi + self.right) or (self.left >= 0 and c1 - 1 < diag_lo - self.left):
            return False
        diag = torch.arange(r0, r1, device=self.device).unsqueeze(1) + self.offset
        j = torch.arange(c0, c1, device=self.device).unsqueeze(0)
        ok = torch.ones(r1 - r0, c1 - c0, dtype=torch.bool, device=self.device)
        if self.right >= 0:
            ok &= j <= diag + self.right
        if self.left >= 0:
            ok &= j >= diag - self.left
        return ok


def _bias_block(bias, r0, r1, c0, c1):
    """The attn_bias entries of one block (None without a bias); broadcast dimensions stay 1."""
    if bias is None:
        return None
    return bias[..., slice(r0, r1) if bias.shape[-2] > 1 else slice(None),
                slice(c0, c1) if bias.shape[-1] > 1 else slice(None)]


def _scores(qb, kb, scale, softcap, alibi, r0, c0, alibi_offset, mask, bias=None):
    """Scaled (and optionally soft-capped, ALiBi-biased, attn_bias-ed, masked) scores of one block; also
    tanh for the softcap's derivative."""
    s = torch.matmul(qb, kb.transpose(-2, -1)) * scale
    t = None
    if softcap:
        t = torch.tanh(s / softcap)
        s = softcap * t
    if alibi is not None:
        i = torch.arange(r0, r0 + s.shape[-2], device=s.device).unsqueeze(1)
        j = torch.arange(c0, c0 + s.shape[-1], device=s.device).unsqueeze(0)
        # ALiBi distances are bottom-right aligned whatever the causal alignment, as in flash-attn.
        s = s - alibi.view(1, -1, 1, 1) * (i + alibi_offset - j).abs()
    if bias is not None:
        s = s.masked_fill(~bias, float("-inf")) if bias.dtype == torch.bool else s + bias
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return s, t


def _kept(dropout, r0, r1, c0, c1, shape, device):
    """Dropout's keep mask of one block, rescaled (1/(1-p) where kept, 0 where dropped), or None without
    dropout: drawn from a generator seeded by the call's seed and the block, so the backward replays it."""
    if dropout is None:
        return None
    p, seed = dropout
    gen = torch.Generator(device=device).manual_seed((seed * 1_000_003 + r0 * 65_537 + c0) % 2**62)
    keep = torch.rand((*shape, r1 - r0, c1 - c0), generator=gen, device=device) >= p
    return keep / (1 - p)


class _TiledAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, scale, mask, softcap, alibi, block_q, block_k, dropout):
        # q: (B, H, Sq, D); k, v: (B, H, Sk, D), already in the accumulation dtype.
        sq, sk = q.shape[-2], k.shape[-2]
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:-1], dtype=q.dtype, device=q.device)
        for r0 in range(0, sq, block_q):
            r1 = min(r0 + block_q, sq)
            qb = q[..., r0:r1, :]
            m = torch.full(qb.shape[:-1], float("-inf"), dtype=q.dtype, device=q.device)
            l = torch.zeros_like(m)
            acc = torch.zeros_like(qb)
            for c0 in range(0, sk, block_k):
                c1 = min(c0 + block_k, sk)
                blk_mask = mask.block(r0, r1, c0, c1)
                if blk_mask is False:
                    continue
                s, _ = _scores(qb, k[..., c0:c1, :], scale, softcap, alibi, r0, c0, sk - sq, blk_mask,
                               _bias_block(bias, r0, r1, c0, c1))
                m_new = torch.maximum(m, s.amax(dim=-1))
                m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)  # rows seeing nothing yet
                p = torch.exp(s - m_safe.unsqueeze(-1))
                alpha = torch.exp(m - m_safe)
                l = l * alpha + p.sum(dim=-1)  # the softmax's sum is over the probabilities before dropout
                kept = _kept(dropout, r0, r1, c0, c1, q.shape[:2], q.device)
                acc = acc * alpha.unsqueeze(-1) + torch.matmul(p if kept is None else p * kept, v[..., c0:c1, :])
                m = m_new
            seen = l > 0  # a query that may attend to no key returns zeros, as flash-attn does
            out[..., r0:r1, :] = torch.where(seen.unsqueeze(-1), acc / l.clamp_min(1e-30).unsqueeze(-1), 0.0)
            lse[..., r0:r1] = torch.where(seen, m + torch.log(l.clamp_min(1e-30)), float("inf"))
        ctx.save_for_backward(q, k, v, out, lse, bias)
        ctx.args = (scale, mask, softcap, alibi, block_q, block_k, dropout)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, bias = ctx.saved_tensors
        dbias = torch.zeros_like(bias) if ctx.needs_input_grad[3] else None
        scale, mask, softcap, alibi, block_q, block_k, dropout = ctx.args
        dout = dout.to(q.dtype)
        sq, sk = q.shape[-2], k.shape[-2]
        delta = (dout * out).sum(dim=-1)  # rowsum(dO * O), the softmax backward's correction term
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for c0 in range(0, sk, block_k):
            c1 = min(c0 + block_k, sk)
            kb, vb = k[..., c0:c1, :], v[..., c0:c1, :]
            for r0 in range(0, sq, block_q):
                r1 = min(r0 + block_q, sq)
                blk_mask = mask.block(r0, r1, c0, c1)
                if blk_mask is False:
                    continue
                qb, dob = q[..., r0:r1, :], dout[..., r0:r1, :]
                s, t = _scores(qb, kb, scale, softcap, alibi, r0, c0, sk - sq, blk_mask,
                               _bias_block(bias, r0, r1, c0, c1))
                p = torch.exp(s - lse[..., r0:r1].unsqueeze(-1))  # recomputed from the saved log-sum-exp
                kept = _kept(dropout, r0, r1, c0, c1, q.shape[:2], q.device)  # the forward's mask, replayed
                dv[..., c0:c1, :] += torch.matmul((p if kept is None else p * kept).transpose(-2, -1), dob)
                dp = torch.matmul(dob, vb.transpose(-2, -1))
                if kept is not None:
                    dp = dp * kept
                ds = p * (dp - delta[..., r0:r1].unsqueeze(-1))
                if dbias is not None:  # the bias is added after the cap: its gradient is dS itself
                    dims = [i for i in range(4) if bias.shape[i] == 1 and ds.shape[i] > 1]
                    _bias_block(dbias, r0, r1, c0, c1).add_(ds.sum(dim=dims, keepdim=True) if dims else ds)
                if softcap:
                    ds = ds * (1 - t * t)
                dq[..., r0:r1, :] += torch.matmul(ds, kb) * scale
                dk[..., c0:c1, :] += torch.matmul(ds.transpose(-2, -1), qb) * scale
        return dq, dk, dv, dbias, None, None, None, None, None, None, None


def attention(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
              alibi_slopes=None, deterministic=False, causal_alignment="bottom_right", block_q=64, block_k=64,
              attn_bias=None):
    """flash-attn's calling convention; block_q and block_k set the tile sizes. The backward is always
    deterministic (a fixed loop order, no atomics), so ``deterministic`` changes nothing. ``attn_bias``:
    a bool keep-mask or a float bias added to the scaled scores, broadcastable to (batch, heads,
    seqlen_q, seqlen_k), read block by block (its gradient too)."""
    in_dtype = q.dtype
    acc = torch.float64 if in_dtype == torch.float64 else torch.float32
    qh, kh, vh = (t.transpose(1, 2).to(acc) for t in (q, k, v))  # (B, H, S, D)
    group = qh.shape[1] // kh.shape[1]
    if group > 1:  # GQA/MQA: query head h reads key/value head h // group
        kh, vh = kh.repeat_interleave(group, dim=1), vh.repeat_interleave(group, dim=1)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    mask = _Mask(q.shape[1], k.shape[1], causal, causal_alignment, tuple(window_size), q.device)
    alibi = None if alibi_slopes is None else alibi_slopes.to(device=q.device, dtype=acc)
    bias = attn_bias
    if bias is not None:
        bias = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
        bias = bias if bias.dtype == torch.bool else bias.to(acc)
    # dropout: a seed drawn from torch's generator (so torch.manual_seed reproduces the call), masks per block
    dropout = (float(dropout_p), int(torch.randint(0, 2**31, (1,)))) if dropout_p else None
    out = _TiledAttention.apply(qh, kh, vh, bias, scale, mask, softcap, alibi, block_q, block_k, dropout)
    return out.transpose(1, 2).to(in_dtype)


# flash_attn_varlen_func's convention: each packed sequence attends only to itself; its keys may outnumber its
# queries (a mixed prefill and decode batch over a KV cache, bottom-right), paged through block_table.
varlen_attention = varlen_with(attention)


# flash_attn_with_kvcache's convention: new keys/values written into the caches (in place) after each
# item's cache_seqlens tokens, contiguous or paged (block_table); q attends to the filled part, bottom-right.
kvcache_attention = kvcache_with(attention)


BACKEND = Backend(
    name="tiled",
    fn=attention,
    capabilities=Capabilities(causal=("bottom_right", "top_left"), head_dim_max=1024, memory="linear",
                              window=True, softcap=True, alibi=True, varlen=True, kvcache=True,
                              attn_bias=True, bias_grad=True, paged_kv=True, mixed_batch=True, dropout=True,
                              deterministic_backward=True),
    description="FlashAttention's algorithm (online softmax, recomputing backward) in plain PyTorch",
    varlen_fn=varlen_attention,
    kvcache_fn=kvcache_attention,
)
