"""KV-cache decoding, flash-attn's ``flash_attn_with_kvcache``: a few new tokens (1 or more) are
written into each batch item's cache after the tokens already there (cache_seqlens, different per item)
and attend to the filled part, bottom-right causal when causal. The output equals the reference over
exactly those keys, and the cache holds the new keys and values where they belong, nothing else moved.

Paged (``page_block``, flash-attn's ``block_table``; blocks of 16, 64, 128 and 256 tokens, realised in the
backend's declared multiple): the caches are blocks of page_block tokens, each
item's blocks named in order by a randomly permuted table, two blocks named by no table; cache lengths
end inside a block and new tokens cross block boundaries. The cache, read back through the table, must
hold what the contiguous one would; the blocks no table names must not change.

Mixed prefill and decode (``new_seqlens``, capability ``mixed_batch``): the items of one batch add
different numbers of new tokens (1 for a decode row, many for a prefill row) to caches of different
lengths, paged or not; the caller writes them into the cache and the kernel reads it through
``flash_attn_varlen_func``'s convention (packed queries, cu_seqlens_q and cu_seqlens_k of each item's
query and key counts, ``block_table=`` for a paged cache), as a serving engine's continuous batch does."""

from __future__ import annotations

import itertools

import torch

from conformance import grid, judge_memory
from conformance.backend import Backend, call_kvcache, checked_output, invoke, kwargs_for
from conformance.case import Case
from conformance.checks.check import Check
from conformance.expected import expected_for
from conformance.inputs import Inputs, make_inputs
from conformance.tolerance import FORWARD_MULTIPLE, compare
from conformance.verdict import Verdict

NAME = "kvcache"
NEEDS: tuple[str, ...] = ("kvcache",)
CASE_FEATURE = "kvcache"  # the case feature the check exercises: every case (fuzzed too) has it
BASE = Case(batch=2, seqlen_q=1, seqlen_k=256, nheads=4, head_dim=64, dtype="fp32", cache_seqlens=(100, 37))


def intents() -> list[grid.Intent]:
    b, it = BASE, grid.intent
    return [
        it("decode one token", b),
        it("decode 3 tokens, causal", b.replace(seqlen_q=3, causal="bottom_right")),
        it("empty and full caches, GQA, causal", b.replace(seqlen_q=5, cache_seqlens=(0, 251), nheads=8, nheads_k=2,
                                                           causal="bottom_right")),
        it("decode, MQA, fp16", b.replace(dtype="fp16", nheads=8, nheads_k=1)),
        it("decode 4 tokens, causal, bf16", b.replace(dtype="bf16", seqlen_q=4, causal="bottom_right")),
        *(it(f"cache of 1024, {sq} new, {dt}{', causal' if c else ''}",
             b.replace(batch=3, seqlen_q=sq, seqlen_k=1024, cache_seqlens=(1000, 513, 7), dtype=dt, causal=c), 1,
             pin=("dtype",)) for sq in (1, 16) for dt in ("fp16", "bf16") for c in (None, "bottom_right")),
        *(it(f"cache of 4096, {dt}", b.replace(batch=2, seqlen_q=1, seqlen_k=4096, cache_seqlens=(4000, 2049), dtype=dt,
                                               nheads=8, nheads_k=2), 1, pin=("dtype",)) for dt in ("fp16", "bf16")),
        # paged: block sizes 16, 64, 128 and 256 (flash-attn's multiple); lengths ending inside a block, new
        # tokens crossing a boundary, an empty cache, a full one
        it("paged 16, permuted table, 4 new across a block boundary, causal",
           b.replace(batch=3, seqlen_q=4, seqlen_k=128, cache_seqlens=(14, 37, 0), page_block=16, causal="bottom_right")),
        it("paged 256, decode, a cache ending on and one inside a block",
           b.replace(seqlen_q=1, seqlen_k=512, cache_seqlens=(255, 300), page_block=256)),
        it("paged 256, 3 new across a boundary, GQA, causal, fp16",
           b.replace(batch=3, seqlen_q=3, seqlen_k=768, cache_seqlens=(254, 511, 765), page_block=256, nheads=8,
                     nheads_k=2, causal="bottom_right", dtype="fp16")),
        it("paged 16, MQA, bf16, empty and full caches",
           b.replace(seqlen_q=2, seqlen_k=64, cache_seqlens=(0, 62), page_block=16, nheads=8, nheads_k=1, dtype="bf16")),
        # blocks of 64 and 128 (a kernel right for 16, 32 and 256 only must fail); for a backend declaring a
        # multiple (flash-attn: 256) they are realised at that multiple, same blocks and in-block offsets
        it("paged 64, 5 new across a boundary in every item, GQA",
           b.replace(batch=3, seqlen_q=5, seqlen_k=256, cache_seqlens=(62, 127, 190), page_block=64, nheads=8,
                     nheads_k=2)),
        it("paged 128, 2 new, one across a boundary, one inside a block, causal, fp16",
           b.replace(seqlen_q=2, seqlen_k=384, cache_seqlens=(127, 300), page_block=128, causal="bottom_right",
                     dtype="fp16")),
        # mixed prefill and decode rows in one batch (flash_attn_varlen_func over the cache): items adding 1 token
        # (decode) and many (prefill) to caches of different lengths, an empty one among them
        it("mixed prefill and decode, paged 16, causal, a prefill into an empty cache, 4 new across a boundary",
           b.replace(batch=4, seqlen_q=9, seqlen_k=128, cache_seqlens=(0, 37, 100, 15), new_seqlens=(9, 1, 1, 4),
                     page_block=16, causal="bottom_right")),
        it("mixed prefill and decode, contiguous, GQA, causal, fp16",
           b.replace(batch=3, seqlen_q=17, seqlen_k=256, cache_seqlens=(200, 0, 64), new_seqlens=(1, 17, 5),
                     nheads=8, nheads_k=2, causal="bottom_right", dtype="fp16")),
        it("mixed prefill and decode, paged 64, MQA, bf16",
           b.replace(batch=3, seqlen_q=33, seqlen_k=256, cache_seqlens=(63, 0, 150), new_seqlens=(1, 33, 12),
                     page_block=64, nheads=8, nheads_k=1, dtype="bf16")),
        *(it(f"mixed prefill and decode, paged 256, cache of 2048, a prefill of 300, {dt}{', causal' if c else ''}",
             b.replace(batch=4, seqlen_q=300, seqlen_k=2048, cache_seqlens=(1000, 0, 1791, 7), new_seqlens=(1, 300, 1, 64),
                       page_block=256, dtype=dt, causal=c), 1, pin=("dtype",))
          for dt in ("fp16", "bf16") for c in (None, "bottom_right")),
        *(it(f"paged 256, cache of 2048, {sq} new, {dt}{', causal' if c else ''}",
             b.replace(batch=3, seqlen_q=sq, seqlen_k=2048, cache_seqlens=(1000, 1791, 7), page_block=256, dtype=dt,
                       causal=c), 1, pin=("dtype",)) for sq in (1, 16) for dt in ("fp16", "bf16")
          for c in (None, "bottom_right")),
        *(it(f"cache of 8192, {sq} new, {dt}, head dim {d}",
             b.replace(batch=2, seqlen_q=sq, seqlen_k=8192, cache_seqlens=(8000, 4097), dtype=dt, head_dim=d,
                       causal="bottom_right"), 2, pin=("dtype",))
          for sq in (1, 64) for dt in ("fp16", "bf16") for d in (64, 128)),
    ]


def cases(tier: str) -> list[Case]:
    return grid.nominal(intents(), tier)


def run(backend: Backend, case: Case, device: str) -> Verdict:
    verdict = Verdict(NAME, backend.name, case, device)
    if case.new_seqlens is not None:
        return _run_mixed(backend, case, device, verdict)
    inputs = make_inputs(case, device)  # k, v: the caches (past cache_seqlens: stale numbers)
    fresh = make_inputs(case, device, seed_offset=1)
    sq = case.seqlen_q
    # the kernel gets copies: the reference below is computed from tensors it never held
    k_new, v_new = (t[:, :sq].contiguous() for t in (fresh.k, fresh.v))
    k_cache, v_cache = inputs.k.contiguous().clone(), inputs.v.contiguous().clone()
    lengths = torch.tensor(case.cache_seqlens, dtype=torch.int32, device=k_cache.device)
    given = (inputs.q.clone(), k_new.clone(), v_new.clone(), lengths.clone())
    inputs, k_new, v_new, lengths = judge_memory.copied((inputs, k_new, v_new, lengths))  # out of its reach
    originals = (inputs.q, k_new, v_new, lengths)
    if case.page_block is None:
        out = call_kvcache(backend, *given[:1], k_cache, v_cache, *given[1:], case)
    else:
        table, spare, (k_pages, v_pages) = _paged(case, k_cache, v_cache)
        spare_before = judge_memory.copied((k_pages[spare], v_pages[spare]))
        given, originals = given + (table.clone(),), originals + (table,)
        out = call_kvcache(backend, *given[:1], k_pages, v_pages, *given[1:4], case, block_table=given[4])
        if not (torch.equal(k_pages[spare], spare_before[0]) and torch.equal(v_pages[spare], spare_before[1])):
            verdict.fail("cache-update", f"blocks {spare.tolist()}, named by no block table, were written")
        k_cache, v_cache = (pages[table.long()].flatten(1, 2) for pages in (k_pages, v_pages))  # read back
    for name, now, before in zip(("q", "k", "v", "cache_seqlens", "block_table"), given, originals):
        if not torch.equal(now, before):
            verdict.fail("inputs-unmodified", f"the call modified its input {name} in place")
    for b, n in enumerate(case.cache_seqlens):
        for name, cache, before, new in (("k", k_cache, inputs.k, k_new), ("v", v_cache, inputs.v, v_new)):
            want = before[b].clone()
            want[n: n + sq] = new[b]
            if not torch.equal(cache[b], want):
                verdict.fail("cache-update", f"batch item {b}: the {name} cache does not hold the new tokens at "
                                             f"{n}..{n + sq - 1} and the old ones elsewhere")
        keys, values = (torch.cat([before[b, :n], new[b]]).unsqueeze(0) for before, new in
                        ((inputs.k, k_new), (inputs.v, v_new)))
        sub = case.replace(batch=1, seqlen_k=n + sq, cache_seqlens=None, page_block=None)
        exp = expected_for(Inputs(inputs.q[b: b + 1], keys, values, inputs.dout[b: b + 1]), sub,
                           backend.capabilities.masked_rows, False, backend.capabilities.accumulation)
        verdict.add("kvcache-reference", compare(f"batch item {b} ({n} cached + {sq} new)", out[b: b + 1], exp.out,
                                                 exp.out_torch_error, exp.out_magnitude, case.torch_dtype,
                                                 FORWARD_MULTIPLE, n + sq, exp.logit_magnitude, at=(b,)))
    return verdict


def _run_mixed(backend: Backend, case: Case, device: str, verdict: Verdict) -> Verdict:
    """A mixed prefill and decode batch: item b's new_seqlens[b] new keys and values are written after its
    cache_seqlens[b] (by the caller, as a serving engine writes its cache before attention), then
    ``varlen_fn`` gets its new_seqlens[b] queries packed with the other items' (cu_seqlens_q) and its
    cache_seqlens[b] + new_seqlens[b] keys (cu_seqlens_k; through block_table for a paged cache). Each
    item's output equals its own reference, bottom-right aligned when causal; the kernel writes nothing."""
    inputs = make_inputs(case, device)
    fresh = make_inputs(case, device, seed_offset=1)
    news, totals = case.new_seqlens, [n + m for n, m in zip(case.cache_seqlens, case.new_seqlens)]
    k_full, v_full = inputs.k.contiguous().clone(), inputs.v.contiguous().clone()
    for b, (n, m) in enumerate(zip(case.cache_seqlens, news)):
        k_full[b, n: n + m], v_full[b, n: n + m] = fresh.k[b, :m], fresh.v[b, :m]
    q = torch.cat([inputs.q[b, :m] for b, m in enumerate(news)])
    cu_q, cu_k = (torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=q.device)
                  for lens in (news, totals))
    if case.page_block is None:
        k, v = (torch.cat([c[b, :t] for b, t in enumerate(totals)]) for c in (k_full, v_full))
        originals = (q, k, v, cu_q, cu_k)
    else:
        table, _, (k, v) = _paged(case, k_full, v_full)
        originals = (q, k, v, cu_q, cu_k, table)
    given = tuple(t.clone() for t in originals)
    # what the verdict is computed from, out of the kernel's reach (judge_memory.py): it gets the copies above
    originals, inputs, k_full, v_full = judge_memory.copied((originals, inputs, k_full, v_full))
    kwargs = kwargs_for(backend, case, q.device)
    kwargs.pop("causal_alignment", None)  # a cache is read bottom-right aligned by definition
    if case.page_block is not None:
        kwargs["block_table"] = given[5]
    out = checked_output(backend, invoke(backend, backend.varlen_fn, *given[:5], max(news), max(totals), **kwargs), q)
    for name, now, before in zip(("q", "k (the cache)", "v (the cache)", "cu_seqlens_q", "cu_seqlens_k",
                                  "block_table"), given, originals):
        if not torch.equal(now, before):
            verdict.fail("inputs-unmodified", f"the call modified its input {name} in place")
    bounds = cu_q.tolist()
    for b, (m, t) in enumerate(zip(news, totals)):
        sub = case.replace(batch=1, seqlen_q=m, seqlen_k=t, cache_seqlens=None, page_block=None, new_seqlens=None)
        own = Inputs(inputs.q[b: b + 1, :m], k_full[b: b + 1, :t], v_full[b: b + 1, :t], inputs.dout[b: b + 1, :m])
        exp = expected_for(own, sub, backend.capabilities.masked_rows, False, backend.capabilities.accumulation)
        kind = "decode" if m == 1 else "prefill"
        verdict.add("kvcache-reference", compare(f"batch item {b}, {kind} ({t - m} cached + {m} new)",
                                                 out[bounds[b]: bounds[b + 1]].unsqueeze(0), exp.out,
                                                 exp.out_torch_error, exp.out_magnitude, case.torch_dtype,
                                                 FORWARD_MULTIPLE, t, exp.logit_magnitude, at=(0, bounds[b])))
    return verdict


def _paged(case: Case, k_cache: torch.Tensor, v_cache: torch.Tensor):
    """The caches as pages: (batch * blocks per item + 2, page_block, nheads_k, head_dim), item b's block
    i at table[b, i] of a random permutation; the two blocks no table names (spare) hold other numbers."""
    page, per = case.page_block, case.seqlen_k // case.page_block
    gen = torch.Generator().manual_seed(case.seed * 1000 + 13)
    order = torch.randperm(case.batch * per + 2, generator=gen)
    table = order[: case.batch * per].view(case.batch, per).to(device=k_cache.device, dtype=torch.int32)
    spare = order[case.batch * per:].to(k_cache.device)
    pages = []
    for cache in (k_cache, v_cache):
        paged = (torch.randn((len(order), page, *cache.shape[2:]), generator=gen) * 4).to(cache.device, cache.dtype)
        paged[table.long()] = cache.view(case.batch, per, page, *cache.shape[2:])
        pages.append(paged)
    return table, spare, pages


CHECK = Check(NAME, cases, run, needs=NEEDS, feature=CASE_FEATURE, intents=intents)
