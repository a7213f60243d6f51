"""FlashAttention-2 in Triton: forward and backward, written to be read beside the algorithm.

    out = attention(q, k, v, softmax_scale=None, causal=False)

q (batch, seqlen_q, heads, d), k and v (batch, seqlen_k, heads_k, d), flash-attn's layout and calling
convention; heads_k divides heads (GQA, MQA); any strides; d 64 or 128; fp16 or bf16 (and fp32, with
IEEE dot products, which the suite runs under Triton's interpreter); causal is bottom-right aligned
(query i sees key j <= i + seqlen_k - seqlen_q), as flash-attn >= 2.1; a query that sees no key gets
zeros and zero gradients. Memory beyond q, k, v, out: the log-sum-exp and delta, one float32 per query
row and head.

The algorithm is FlashAttention-2 (Tri Dao, "FlashAttention-2: Faster Attention with Better Parallelism
and Work Partitioning", 2023, arXiv:2307.08691): Algorithm 1 (forward) and Algorithm 2 (backward).
The comments name the lines of those algorithms. The code is this project's own; technique was studied
in Triton's fused-attention tutorial (python/tutorials/06-fused-attention.py: exp2 with log2(e) folded
into the scale, the causal loop split into blocks needing no mask and blocks on the diagonal, the
backward in a dK/dV pass over query blocks and a dQ pass over key blocks).

Self-contained on purpose (torch and triton only), so that it loads both ways the suite takes a kernel:
the import string ``kernels/triton_flash/flash.py:attention`` and the installed entry point ``triton``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e)): exp2 is the GPU's native instruction
# Triton compiles a kernel again for each integer argument that is 1 or a multiple of 16; for lengths and
# head counts that buys nothing here (loop bounds, masks) and would compile every kernel again per shape.
# Strides stay specialized: a row stride that is a multiple of 16 allows wide loads.


# ---------------------------------------------------------------------------------------------------
# Forward: FlashAttention-2, Algorithm 1. One program per (block of BLOCK_M queries, batch, head).
# ---------------------------------------------------------------------------------------------------
@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, offs_m, offs_d,
               lo, hi, seqlen_k, diag, qk_scale, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
               CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    """Algorithm 1, lines 6-10 (the inner loop over key blocks j), for key blocks [lo, hi).

    The state per query row: m_i, the largest score seen (line 8's m_i^(j)), l_i, the sum of exp(score -
    m_i) (l_i^(j)), and acc, the unnormalised output (O_i^(j)). Scores are in log2 units (scaled by
    softmax_scale * log2(e)), so exp becomes exp2 with the same m and l.
    MASKED: this range holds the tail block past seqlen_k or blocks on the causal diagonal; the other
    blocks (most of them) are visible to every query of the block and run without a mask."""
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + offs_n0
        k_ptrs = k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd  # K_j^T, (d, BLOCK_N)
        v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd  # V_j, (BLOCK_N, d)
        if MASKED:
            k_t = tl.load(k_ptrs, mask=offs_n[None, :] < seqlen_k, other=0.0)
        else:
            k_t = tl.load(k_ptrs)
        # line 8: S_i^(j) = Q_i K_j^T (times the scale, in log2 units)
        s = tl.dot(q, k_t, input_precision=PRECISION) * qk_scale
        if MASKED:
            valid = offs_n[None, :] < seqlen_k
            if CAUSAL:  # bottom-right: query i sees key j <= i + (seqlen_k - seqlen_q)
                valid = valid & (offs_n[None, :] <= offs_m[:, None] + diag)
            s = tl.where(valid, s, float("-inf"))
        # line 9: m_i^(j) = max(m_i^(j-1), rowmax(S_i^(j)))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASKED:  # a row that has seen no key yet keeps m = -inf: shift by 0, not by -inf (no NaN)
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_shift = m_new
        # line 9: P~_i^(j) = exp(S_i^(j) - m_i^(j))
        p = tl.math.exp2(s - m_shift[:, None])
        # line 9: l_i^(j) = exp(m_i^(j-1) - m_i^(j)) l_i^(j-1) + rowsum(P~_i^(j)): the old sum is rescaled
        # to the new maximum; this rescale is the "online" in online softmax
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        # line 10: O_i^(j) = diag(exp(m_i^(j-1) - m_i^(j))) O_i^(j-1) + P~_i^(j) V_j; P~ is rounded to the
        # input dtype for the tensor cores, the sum stays in float32
        if MASKED:
            v = tl.load(v_ptrs, mask=offs_n[:, None] < seqlen_k, other=0.0)
        else:
            v = tl.load(v_ptrs)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["nheads", "group", "seqlen_q", "seqlen_k"])
def _fwd_kernel(Q, K, V, O, LSE, stride_qb, stride_qm, stride_qh, stride_qd, stride_kb, stride_kn, stride_kh,
                stride_kd, stride_vb, stride_vn, stride_vh, stride_vd, stride_ob, stride_om, stride_oh, stride_od,
                nheads, group, seqlen_q, seqlen_k, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // nheads).to(tl.int64)
    h = bh % nheads
    hk = (h // group).to(tl.int64)  # GQA/MQA: query heads h of one group share key/value head h // group
    h = h.to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    diag = seqlen_k - seqlen_q
    # Algorithm 1, lines 4-5: load Q_i; m = -inf, l = 0, O = 0
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=offs_m[:, None] < seqlen_q, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    # Which key blocks: [0, full) are seen whole by every query of this block (no mask); [full, hi) hold
    # the causal diagonal and the tail past seqlen_k (masked); keys from hi on are in every query's future
    # and are skipped (causal: half the work).
    if CAUSAL:
        hi = tl.maximum(tl.minimum(seqlen_k, start_m + BLOCK_M + diag), 0)  # keys the last row sees
        full = tl.maximum(tl.minimum(seqlen_k, start_m + diag + 1), 0)  # keys the first row sees
    else:
        hi = seqlen_k
        full = seqlen_k
    full = full // BLOCK_N * BLOCK_N
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, offs_m,
                               offs_d, 0, full, seqlen_k, diag, qk_scale, BLOCK_N, False, CAUSAL, PRECISION)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, offs_m,
                               offs_d, full, hi, seqlen_k, diag, qk_scale, BLOCK_N, True, CAUSAL, PRECISION)
    # line 12: O_i = diag(l_i)^-1 O_i. A row that saw no key (l = 0) returns zeros, as flash-attn does.
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    # line 13: L_i = m_i + log(l_i), the log-sum-exp the backward pass recomputes P from (log2 units).
    # A row that saw no key stores +inf, so that its recomputed P = exp2(s - inf) is 0.
    lse = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("inf"))
    row_ok = offs_m < seqlen_q
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
             out.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + bh.to(tl.int64) * seqlen_q + offs_m, lse, mask=row_ok)


# ---------------------------------------------------------------------------------------------------
# Backward: FlashAttention-2, Algorithm 2, with P recomputed from the saved log-sum-exp.
#   delta_i = rowsum(dO_i * O_i)                       (line 4: D_i)
#   P = exp(S - L)          dV = P^T dO                 (lines 11, 12)
#   dP = dO V^T             dS = P * (dP - delta)      (lines 13, 14)
#   dQ = scale * dS K       dK = scale * dS^T Q         (lines 15, 16)
# Algorithm 2 updates dQ from every key block with atomic adds; here a dK/dV kernel (one program per key
# block, looping over the query blocks) and a dQ kernel (one program per query block, looping over the
# key blocks) each recompute P: two more matrix products, no atomics, so the gradients are deterministic.
# ---------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["nheads", "seqlen_q"])
def _bwd_preprocess(O, DO, DELTA, stride_ob, stride_om, stride_oh, stride_od, stride_dob, stride_dom, stride_doh,
                    stride_dod, nheads, seqlen_q, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """Algorithm 2, line 4: delta_i = rowsum(dO_i * O_i), in float32 (equal to rowsum(P * dP))."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    bh = tl.program_id(1)
    b = (bh // nheads).to(tl.int64)
    h = (bh % nheads).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_m[:, None] < seqlen_q
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                mask=rows, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                 mask=rows, other=0.0).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * seqlen_q + offs_m, tl.sum(o * do, 1), mask=offs_m < seqlen_q)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_qd, stride_dom, stride_dod,
                    offs_n, offs_d, lo, hi, seqlen_q, diag, qk_scale, BLOCK_M: tl.constexpr, MASKED: tl.constexpr,
                    PRECISION: tl.constexpr):
    """Algorithm 2, lines 7-16 for one key block (K_j, V_j resident) and query blocks [lo, hi), in the
    transposed form: S^T, P^T, dP^T, dS^T are (BLOCK_N, BLOCK_M), so that dV and dK are plain products.
    MASKED: blocks on the causal diagonal. Query rows past seqlen_q load L = +inf and dO = 0: P = 0 there."""
    offs_m0 = tl.arange(0, BLOCK_M)
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + offs_m0
        rows = offs_m < seqlen_q
        q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=rows[:, None], other=0.0)
        lse = tl.load(lse_base + offs_m, mask=rows, other=float("inf"))
        # line 11: P_i^(j) = exp(S_i^(j) - L_i), recomputed: the saved L makes it one exp per score, no max/sum
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
        p_t = tl.math.exp2(s_t - lse[None, :])
        if MASKED:  # query i sees key j <= i + diag
            p_t = tl.where(offs_m[None, :] + diag >= offs_n[:, None], p_t, 0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod, mask=rows[:, None],
                     other=0.0)
        # line 12: dV_j += P_i^(j)T dO_i
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
        # line 13: dP_i^(j) = dO_i V_j^T (here its transpose, V_j dO_i^T)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        # line 14: dS_i^(j) = P_i^(j) * (dP_i^(j) - D_i)
        delta = tl.load(delta_base + offs_m, mask=rows, other=0.0)
        ds_t = p_t * (dp_t - delta[None, :])
        # line 16: dK_j += dS_i^(j)T Q_i (the softmax scale is applied once, at the end)
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=["nheads", "nheads_k", "group", "seqlen_q", "seqlen_k"])
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, stride_qb, stride_qm, stride_qh, stride_qd, stride_kb, stride_kn,
                     stride_kh, stride_kd, stride_vb, stride_vn, stride_vh, stride_vd, stride_dob, stride_dom,
                     stride_doh, stride_dod, stride_dkb, stride_dkn, stride_dkh, stride_dkd, stride_dvb, stride_dvn,
                     stride_dvh, stride_dvd, nheads, nheads_k, group, seqlen_q, seqlen_k, qk_scale, sm_scale,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                     PRECISION: tl.constexpr):
    """One program per (key block j, batch, key/value head): Algorithm 2's outer loop (line 5) with its
    dK_j, dV_j accumulators (line 6) in registers, over every query head of the GQA group."""
    start_n = tl.program_id(0) * BLOCK_N
    bhk = tl.program_id(1)
    b = (bhk // nheads_k).to(tl.int64)
    hk = (bhk % nheads_k).to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    cols = offs_n < seqlen_k
    # line 6: load K_j, V_j (past seqlen_k: zeros, whose dK, dV rows are never stored); dK_j = dV_j = 0
    k = tl.load(K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=cols[:, None], other=0.0)
    v = tl.load(V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=cols[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    diag = seqlen_k - seqlen_q
    # Which query blocks: causal, query i sees key j iff i >= j - diag, so blocks before `lo` see none of
    # this key block and are skipped; [lo, full) hold the diagonal (masked); from `full` on every query of
    # a block sees every key of this block (no mask).
    if CAUSAL:
        lo = tl.maximum(start_n - diag, 0) // BLOCK_M * BLOCK_M
        full = tl.maximum(tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - diag, 0), BLOCK_M) * BLOCK_M, lo)
    else:
        lo = 0
        full = 0
    for g in range(group):
        h = hk * group + g
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        lse_base = LSE + (b * nheads + h) * seqlen_q
        delta_base = DELTA + (b * nheads + h) * seqlen_q
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_qd, stride_dom,
                                 stride_dod, offs_n, offs_d, lo, full, seqlen_q, diag, qk_scale, BLOCK_M, True,
                                 PRECISION)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_qd, stride_dom,
                                 stride_dod, offs_n, offs_d, full, seqlen_q, seqlen_q, diag, qk_scale, BLOCK_M, False,
                                 PRECISION)
    dk = dk * sm_scale  # dS was taken w.r.t. the scaled scores: dK = scale * dS^T Q
    tl.store(DK + b * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=cols[:, None])
    tl.store(DV + b * stride_dvb + hk * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=cols[:, None])


@triton.jit
def _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, offs_m, offs_d,
                  lo, hi, seqlen_k, diag, qk_scale, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                  CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    """Algorithm 2, lines 8-15 for one query block (Q_i, dO_i, L_i, D_i resident) and key blocks [lo, hi)."""
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + offs_n0
        k_ptrs = k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd  # K_j^T
        v_ptrs = v_base + offs_n[None, :] * stride_vn + offs_d[:, None] * stride_vd  # V_j^T
        if MASKED:
            k_t = tl.load(k_ptrs, mask=offs_n[None, :] < seqlen_k, other=0.0)
            v_t = tl.load(v_ptrs, mask=offs_n[None, :] < seqlen_k, other=0.0)
        else:
            k_t = tl.load(k_ptrs)
            v_t = tl.load(v_ptrs)
        # line 11: P = exp(S - L), recomputed
        s = tl.dot(q, k_t, input_precision=PRECISION) * qk_scale
        p = tl.math.exp2(s - lse[:, None])
        if MASKED:
            valid = offs_n[None, :] < seqlen_k
            if CAUSAL:
                valid = valid & (offs_n[None, :] <= offs_m[:, None] + diag)
            p = tl.where(valid, p, 0.0)
        # lines 13-14: dP = dO V^T, dS = P * (dP - D)
        dp = tl.dot(do, v_t, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        # line 15: dQ_i += dS K_j (scale applied at the end)
        dq = tl.dot(ds.to(k_t.dtype), tl.trans(k_t), dq, input_precision=PRECISION)
    return dq


@triton.jit(do_not_specialize=["nheads", "group", "seqlen_q", "seqlen_k"])
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, stride_qb, stride_qm, stride_qh, stride_qd, stride_kb, stride_kn,
                   stride_kh, stride_kd, stride_vb, stride_vn, stride_vh, stride_vd, stride_dob, stride_dom, stride_doh,
                   stride_dod, stride_dqb, stride_dqm, stride_dqh, stride_dqd, nheads, group, seqlen_q, seqlen_k,
                   qk_scale, sm_scale, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    """One program per (query block i, batch, head): dQ_i over the key blocks this block sees."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // nheads).to(tl.int64)
    h = bh % nheads
    hk = (h // group).to(tl.int64)
    h = h.to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_m < seqlen_q
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=rows[:, None], other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                 mask=rows[:, None], other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * seqlen_q + offs_m, mask=rows, other=float("inf"))
    delta = tl.load(DELTA + bh.to(tl.int64) * seqlen_q + offs_m, mask=rows, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    diag = seqlen_k - seqlen_q
    if CAUSAL:  # the same split as the forward pass
        hi = tl.maximum(tl.minimum(seqlen_k, start_m + BLOCK_M + diag), 0)
        full = tl.maximum(tl.minimum(seqlen_k, start_m + diag + 1), 0)
    else:
        hi = seqlen_k
        full = seqlen_k
    full = full // BLOCK_N * BLOCK_N
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, offs_m,
                       offs_d, 0, full, seqlen_k, diag, qk_scale, BLOCK_N, False, CAUSAL, PRECISION)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, offs_m,
                       offs_d, full, hi, seqlen_k, diag, qk_scale, BLOCK_N, True, CAUSAL, PRECISION)
    dq = dq * sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=rows[:, None])


# ---------------------------------------------------------------------------------------------------
# Launch configurations: chosen per head dim by a sweep on an H100 (README, "Our own Triton kernel").
# A fixed table, not the autotuner: one compilation per (head dim, dtype, causal), none per shape.
# ---------------------------------------------------------------------------------------------------
CONFIGS = {
    # kernel: {(head_dim, causal): (BLOCK_M, BLOCK_N, num_warps, num_stages)}; fp16 and bf16 alike
    "fwd": {(64, False): (128, 128, 4, 3), (64, True): (64, 64, 4, 3),
            (128, False): (128, 128, 8, 3), (128, True): (128, 128, 8, 3)},
    "dkdv": {(64, False): (32, 128, 4, 5), (64, True): (32, 128, 4, 5),
             (128, False): (64, 128, 8, 3), (128, True): (64, 128, 8, 3)},
    "dq": {(64, False): (128, 64, 8, 3), (64, True): (64, 64, 4, 3),
           (128, False): (128, 64, 8, 3), (128, True): (128, 64, 8, 3)},
}
INTERPRETER_CONFIG = (32, 32, 4, 1)  # numpy runs one program at a time: few, medium blocks
PREPROCESS_BLOCK = 128


def _config(kernel: str, head_dim: int, causal: bool, override=None):
    if override is not None:
        return override
    return INTERPRETER_CONFIG if INTERPRET else CONFIGS[kernel][head_dim, causal]


def _precision(dtype):
    return "ieee" if dtype == torch.float32 else None  # float32: exact products, not TF32


def _forward(q, k, v, sm_scale, causal, config=None):
    batch, seqlen_q, nheads, head_dim = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    out = torch.empty((batch, seqlen_q, nheads, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, nheads, seqlen_q), dtype=torch.float32, device=q.device)
    block_m, block_n, warps, stages = _config("fwd", head_dim, causal, config)
    grid = (triton.cdiv(seqlen_q, block_m), batch * nheads)
    _fwd_kernel[grid](q, k, v, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(), nheads,
                      nheads // nheads_k, seqlen_q, seqlen_k, sm_scale * LOG2E, HEAD_DIM=head_dim, BLOCK_M=block_m,
                      BLOCK_N=block_n, CAUSAL=causal, PRECISION=_precision(q.dtype), num_warps=warps,
                      num_stages=stages)
    return out, lse


def _delta(do, out, nheads):
    batch, seqlen_q, _, head_dim = out.shape
    delta = torch.empty((batch, nheads, seqlen_q), dtype=torch.float32, device=out.device)
    _bwd_preprocess[(triton.cdiv(seqlen_q, PREPROCESS_BLOCK), batch * nheads)](
        out, do, delta, *out.stride(), *do.stride(), nheads, seqlen_q, HEAD_DIM=head_dim, BLOCK_M=PREPROCESS_BLOCK)
    return delta


def _dkdv(do, q, k, v, lse, delta, sm_scale, causal, config=None):
    batch, seqlen_q, nheads, head_dim = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    dk = torch.empty((batch, seqlen_k, nheads_k, head_dim), dtype=k.dtype, device=k.device)
    dv = torch.empty((batch, seqlen_k, nheads_k, head_dim), dtype=v.dtype, device=v.device)
    block_m, block_n, warps, stages = _config("dkdv", head_dim, causal, config)
    _bwd_dkdv_kernel[(triton.cdiv(seqlen_k, block_n), batch * nheads_k)](
        q, k, v, do, lse, delta, dk, dv, *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(),
        *dv.stride(), nheads, nheads_k, nheads // nheads_k, seqlen_q, seqlen_k, sm_scale * LOG2E, sm_scale,
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal, PRECISION=_precision(q.dtype),
        num_warps=warps, num_stages=stages)
    return dk, dv


def _dq(do, q, k, v, lse, delta, sm_scale, causal, config=None):
    batch, seqlen_q, nheads, head_dim = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    dq = torch.empty((batch, seqlen_q, nheads, head_dim), dtype=q.dtype, device=q.device)
    block_m, block_n, warps, stages = _config("dq", head_dim, causal, config)
    _bwd_dq_kernel[(triton.cdiv(seqlen_q, block_m), batch * nheads)](
        q, k, v, do, lse, delta, dq, *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(), nheads,
        nheads // nheads_k, seqlen_q, seqlen_k, sm_scale * LOG2E, sm_scale, HEAD_DIM=head_dim, BLOCK_M=block_m,
        BLOCK_N=block_n, CAUSAL=causal, PRECISION=_precision(q.dtype), num_warps=warps, num_stages=stages)
    return dq


def _backward(do, q, k, v, out, lse, sm_scale, causal):
    delta = _delta(do, out, q.shape[2])
    dk, dv = _dkdv(do, q, k, v, lse, delta, sm_scale, causal)
    dq = _dq(do, q, k, v, lse, delta, sm_scale, causal)
    return dq, dk, dv


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sm_scale, causal):
        out, lse = _forward(q, k, v, sm_scale, causal)
        ctx.save_for_backward(q, k, v, out, lse)  # linear memory: the log-sum-exp, not P
        ctx.sm_scale, ctx.causal = sm_scale, causal
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _backward(do, q, k, v, out, lse, ctx.sm_scale, ctx.causal)
        return dq, dk, dv, None, None


def attention(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, deterministic=False):
    """FlashAttention-2 in Triton (forward and backward), flash_attn_func's convention. The backward
    pass is always deterministic (``deterministic`` is accepted, as flash-attn's flag, and changes nothing)."""
    if dropout_p != 0.0:
        raise ValueError("dropout is not implemented (declared: dropout false)")
    head_dim = q.shape[-1]
    if k.shape[-1] != head_dim or v.shape[-1] != head_dim or head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dims {SUPPORTED_HEAD_DIMS} only, got q {q.shape[-1]}, k {k.shape[-1]}, v {v.shape[-1]}")
    if q.shape[2] % k.shape[2] != 0 or k.shape != v.shape:
        raise ValueError("heads_k must divide heads, and k and v must have the same shape")
    scale = softmax_scale if softmax_scale is not None else head_dim ** -0.5
    with torch.cuda.device(q.device) if q.is_cuda else _nothing():
        return _FlashAttention.apply(q, k, v, float(scale), bool(causal))


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


SUPPORTED_HEAD_DIMS = (64, 128)

# The declaration (README, "Test your own kernel"): what this kernel does, and by omission what it does
# not (window, softcap, ALiBi, varlen, KV cache, dropout, top-left causal, head dims other than 64, 128).
attention.conformance_capabilities = {
    # Under TRITON_INTERPRET=1 Triton runs the kernels on CPU tensors with numpy (CI); else on the GPU.
    "devices": ["cpu"] if INTERPRET else ["cuda"],
    "dtypes": ["fp16", "fp32"] if INTERPRET else ["fp16", "bf16"],
    "head_dims": list(SUPPORTED_HEAD_DIMS),
    "causal": ["bottom_right"],
    "masked_rows": "zeros",
    "gqa": True,
    "mqa": True,
    "backward": True,
    "softmax_scale": True,
    "noncontiguous": True,
    "memory": "linear",
    "deterministic_forward": True,
    "deterministic_backward": True,  # no atomics: dK/dV and dQ each written by one program
    "accumulation": "fp32",
}
