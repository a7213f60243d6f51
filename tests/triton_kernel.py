"""A small FlashAttention-style forward kernel in Triton: online softmax over key blocks, GQA/MQA,
bottom-right causal masking, any head dim up to 128 (padded to a power of two), strided inputs.
float32 only (its dot products are IEEE float32, not TF32), no backward.

CI runs it through the suite on the CPU under Triton's interpreter (docs/ci.md):

    TRITON_INTERPRET=1 pytest --pyargs conformance.suite --backend=tests/triton_kernel.py:attention --device=cpu

Under the interpreter it declares the CPU (where the interpreter runs it), otherwise CUDA.
"""

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _forward(Q, K, V, O, sqb, sqs, sqh, sqd, skb, sks, skh, skd, svb, svs, svh, svd, sob, sos, soh, sod,
             H, GROUP, SQ, SK, D, scale, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqs + dims[None, :] * sqd,
                mask=(rows[:, None] < SQ) & (dims[None, :] < D), other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, SK, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        kt = tl.load(K + b * skb + hk * skh + cols[None, :] * sks + dims[:, None] * skd,
                     mask=(cols[None, :] < SK) & (dims[:, None] < D), other=0.0)
        s = tl.dot(q, kt, input_precision="ieee") * scale
        valid = cols[None, :] < SK
        if CAUSAL:  # bottom-right: query i sees keys j <= i + SK - SQ
            valid = valid & (cols[None, :] <= rows[:, None] + SK - SQ)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet: no NaN
        p = tl.exp(s - shift[:, None])
        alpha = tl.exp(m_i - shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + b * svb + hk * svh + cols[:, None] * svs + dims[None, :] * svd,
                    mask=(cols[:, None] < SK) & (dims[None, :] < D), other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # a row that sees no key: zeros, as flash-attn
    tl.store(O + b * sob + h * soh + rows[:, None] * sos + dims[None, :] * sod, out,
             mask=(rows[:, None] < SQ) & (dims[None, :] < D))


def attention(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
    """flash-attn's convention: q (batch, seqlen_q, heads, d), k and v (batch, seqlen_k, heads_k, d)."""
    batch, sq, heads, d = q.shape
    sk, heads_k = k.shape[1], k.shape[2]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    block_d = max(16, triton.next_power_of_2(d))
    grid = (triton.cdiv(sq, 16), batch * heads)
    _forward[grid](q, k, v, out, *q.stride(), *k.stride(), *v.stride(), *out.stride(), heads, heads // heads_k, sq, sk,
                   d, softmax_scale if softmax_scale is not None else d**-0.5, CAUSAL=bool(causal), BLOCK_M=16,
                   BLOCK_N=16, BLOCK_D=block_d)
    return out


attention.conformance_capabilities = {
    "devices": ["cpu"] if os.environ.get("TRITON_INTERPRET") == "1" else ["cuda"],
    "dtypes": ["fp32"], "head_dim_max": 128, "backward": False, "causal": ["bottom_right"], "memory": "linear",
}
