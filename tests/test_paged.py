"""The paged KV cache's grid: block sizes realised in a backend's declared multiple."""

import dataclasses

from conformance import grid
from conformance.backends import tiled
from conformance.checks import CHECKS


def _paged(caps):
    return [r.case for r in grid.for_backend(CHECKS["kvcache"], caps, "cpu", "quick")
            if r.case is not None and r.case.page_block is not None]


def test_block_sizes_64_and_128_are_drawn():
    assert {16, 64, 128, 256} <= {c.page_block for c in _paged(tiled.BACKEND.capabilities)}


def test_block_sizes_are_realised_in_the_declared_multiple_keeping_the_offsets():
    """flash-attn 2.x declares multiples of 256: every paged intent runs there, at 256, with as many blocks
    as the intent and each cache length as far from its block's end (so new tokens still cross a boundary)."""
    caps = dataclasses.replace(tiled.BACKEND.capabilities, page_block_multiple=256)
    nominal = {c.page_block: c for c in _paged(tiled.BACKEND.capabilities)}
    realised = _paged(caps)
    assert len(realised) == len(_paged(tiled.BACKEND.capabilities)) and {c.page_block for c in realised} == {256}
    by_blocks = {(c.batch, c.seqlen_q, c.nheads_k, c.causal): c for c in realised}
    for page, c in nominal.items():
        got = by_blocks[(c.batch, c.seqlen_q, c.nheads_k, c.causal)]
        assert got.seqlen_k // 256 == c.seqlen_k // page
        for n, m in zip(c.cache_seqlens, got.cache_seqlens):
            assert (n // page, -n % page, (n + c.seqlen_q - 1) // page) == (m // 256, -m % 256, (m + c.seqlen_q - 1) // 256)


def test_flex_kvcache_adapter_reads_a_paged_cache_through_its_mask():
    """flex's KV-cache function (declared for CUDA, where it runs compiled): eager flex_attention on the CPU passes
    the kvcache check on a contiguous and a paged cache (permuted table, GQA, causal)."""
    from torch.nn.attention.flex_attention import flex_attention

    from conformance.backends import flex
    from conformance.case import Case
    from conformance.checks import execute

    assert flex.BACKEND.capabilities.kvcache and flex.BACKEND.capabilities.paged_kv
    caps = dataclasses.replace(flex.BACKEND.capabilities, devices=frozenset({"cpu"}))
    eager = dataclasses.replace(flex.BACKEND, capabilities=caps,
                                kvcache_fn=lambda *a, **k: flex.kvcache_attention(*a, flex=flex_attention, **k))
    for case in (Case(batch=2, seqlen_q=3, seqlen_k=64, nheads=4, nheads_k=2, head_dim=16, causal="bottom_right",
                      cache_seqlens=(40, 0), seed=1),
                 Case(batch=3, seqlen_q=4, seqlen_k=64, nheads=4, nheads_k=2, head_dim=16, causal="bottom_right",
                      cache_seqlens=(14, 45, 0), page_block=16, seed=2)):
        verdict = execute("kvcache", eager, case, "cpu")
        assert verdict.passed, verdict.message()
