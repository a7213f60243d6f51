"""`naive`: the lab notes' textbook attention (matmul -> scale -> mask -> softmax -> matmul).

It materialises the (seqlen_q, seqlen_k) score and weight matrices: quadratic memory. Masked scores
are filled with -1e9 as the notes do (clipped to the dtype's range, since float16 cannot hold -1e9),
so a query that may attend to no key gets uniform weights: the mean of V, not zeros. ``attn_bias`` is
SDPA's attn_mask: a bool keep-mask (filled like the causal mask) or a float bias added to the scaled
scores, broadcast to (batch, heads, seqlen_q, seqlen_k); plain autograd differentiates through it.
KV-cache decoding (contiguous or paged, mixed prefill and decode batches too) and packed variable-length
batches call it per batch item, bottom-right.
"""

from __future__ import annotations

import math

import torch

from conformance.backend import Backend
from conformance.backends.kvcache_adapter import kvcache_with, varlen_with
from conformance.capabilities import Capabilities


def attention(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, causal_alignment="bottom_right",
              attn_bias=None):
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (batch, heads, seqlen, head_dim)
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    fill = max(-1e9, torch.finfo(scores.dtype).min)
    if attn_bias is not None and attn_bias.dtype != torch.bool:
        scores = scores + attn_bias
    if causal:
        sq, sk = scores.shape[-2:]
        offset = sk - sq if causal_alignment == "bottom_right" else 0
        mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(offset)
        scores = scores.masked_fill(mask == 0, fill)
    if attn_bias is not None and attn_bias.dtype == torch.bool:
        scores = scores.masked_fill(~attn_bias, fill)
    weights = torch.softmax(scores, dim=-1)
    if dropout_p:  # the probabilities, each kept with 1 - p and rescaled (torch's dropout)
        weights = torch.nn.functional.dropout(weights, dropout_p)
    return torch.matmul(weights, v).transpose(1, 2)


BACKEND = Backend(
    name="naive",
    fn=attention,
    capabilities=Capabilities(causal=("bottom_right", "top_left"), masked_rows="mean_v", head_dim_max=1024,
                              accumulation="input",
                              memory="quadratic", attn_bias=True, bias_grad=True, dropout=True,
                              varlen=True, kvcache=True, paged_kv=True, mixed_batch=True),
    description="textbook attention of the lab notes, plain PyTorch",
    varlen_fn=varlen_with(attention, causal_alignment="bottom_right"),
    kvcache_fn=kvcache_with(attention, causal_alignment="bottom_right"),
)
