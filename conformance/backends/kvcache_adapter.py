"""``flash_attn_with_kvcache``'s convention (and ``flash_attn_varlen_func``'s, for a mixed prefill and
decode batch) over an attention function in ``flash_attn_func``'s, for the backends written in plain
PyTorch: the new keys and values are written into the caches (in place) after each batch item's
``cache_seqlens`` tokens, then its queries attend to the filled part, bottom-right aligned. The caches are
contiguous, (batch, capacity, nheads_k, head_dim), or paged, (num_blocks, page_block, nheads_k, head_dim)
with ``block_table`` (batch, blocks per item) naming each item's blocks in order (flash-attn's paged KV
cache)."""

from __future__ import annotations

import torch


def kvcache_with(attention, **fixed):
    """The KV-cache function of ``attention``; ``fixed``: keyword arguments it always gets."""

    def kvcache_attention(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, block_table=None, **kwargs):
        batch, new = q.shape[0], 0 if k is None else k.shape[1]
        capacity = k_cache.shape[1] * (1 if block_table is None else block_table.shape[1])
        lengths = [capacity] * batch if cache_seqlens is None else (
            [int(cache_seqlens)] * batch if isinstance(cache_seqlens, int) else cache_seqlens.tolist())
        outs = []
        for b, n in enumerate(lengths):
            blocks = None if block_table is None else block_table[b].long()
            if new:
                with torch.no_grad():
                    if blocks is None:
                        k_cache[b, n: n + new] = k[b]
                        v_cache[b, n: n + new] = v[b]
                    else:  # token t of the item lives in its block t // page_block, at t % page_block
                        pos = torch.arange(n, n + new, device=q.device)
                        page = k_cache.shape[1]
                        k_cache[blocks[pos // page], pos % page] = k[b]
                        v_cache[blocks[pos // page], pos % page] = v[b]
            if blocks is None:
                keys, values = k_cache[b: b + 1, : n + new], v_cache[b: b + 1, : n + new]
            else:
                keys, values = (c[blocks].flatten(0, 1)[None, : n + new] for c in (k_cache, v_cache))
            outs.append(attention(q[b: b + 1], keys, values, **fixed, **kwargs))
        return torch.cat(outs)

    return kvcache_attention


def varlen_with(attention, **fixed):
    """The variable-length function of ``attention`` (``flash_attn_varlen_func``'s convention): packed
    (total, heads, head_dim) tensors, sequence i's queries at cu_seqlens_q[i]:cu_seqlens_q[i + 1] attending
    to its keys at cu_seqlens_k[i]:cu_seqlens_k[i + 1], bottom-right aligned where the lengths differ (a
    mixed prefill and decode batch over a KV cache). With ``block_table``, k and v are paged caches
    (num_blocks, page_block, nheads_k, head_dim) and sequence i's keys are the first
    cu_seqlens_k[i + 1] - cu_seqlens_k[i] tokens of its blocks, in table order."""

    def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, block_table=None,
                         deterministic=False, **kwargs):
        bq, bk = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        outs = []
        for i in range(len(bq) - 1):
            if block_table is None:
                keys, values = k[None, bk[i]: bk[i + 1]], v[None, bk[i]: bk[i + 1]]
            else:
                blocks = block_table[i].long()
                keys, values = (c[blocks].flatten(0, 1)[None, : bk[i + 1] - bk[i]] for c in (k, v))
            outs.append(attention(q[None, bq[i]: bq[i + 1]], keys, values, **fixed, **kwargs)[0])
        return torch.cat(outs)

    return varlen_attention
