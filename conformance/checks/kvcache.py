"""KV-cache decoding, flash-attn's ``flash_attn_with_kvcache``: a few new tokens (1 or more) are
written into each batch item's cache after the tokens already there (cache_seqlens, different per item)
and attend to the filled part, bottom-right causal when causal. The output equals the reference over
exactly those keys, and the cache holds the new keys and values where they belong, nothing else moved."""

from __future__ import annotations

import torch

from conformance import grid
from conformance.backend import Backend, call_kvcache
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
        *(it(f"cache of 8192, {sq} new, {dt}, head dim {d}",
             b.replace(batch=2, seqlen_q=sq, seqlen_k=8192, cache_seqlens=(8000, 4097), dtype=dt, head_dim=d,
                       causal="bottom_right"), 2, pin=("dtype",))
          for sq in (1, 64) for dt in ("fp16", "bf16") for d in (64, 128)),
    ]


def cases(tier: str) -> list[Case]:
    return grid.nominal(intents(), tier)


def run(backend: Backend, case: Case, device: str) -> Verdict:
    verdict = Verdict(NAME, backend.name, case, device)
    inputs = make_inputs(case, device)  # k, v: the caches (past cache_seqlens: stale numbers)
    fresh = make_inputs(case, device, seed_offset=1)
    sq = case.seqlen_q
    # the kernel gets copies: the reference below is computed from tensors it never held
    k_new, v_new = (t[:, :sq].contiguous() for t in (fresh.k, fresh.v))
    k_cache, v_cache = inputs.k.contiguous().clone(), inputs.v.contiguous().clone()
    lengths = torch.tensor(case.cache_seqlens, dtype=torch.int32, device=k_cache.device)
    given = (inputs.q.clone(), k_new.clone(), v_new.clone(), lengths.clone())
    out = call_kvcache(backend, *given[:1], k_cache, v_cache, *given[1:], case)
    for name, now, before in zip(("q", "k", "v", "cache_seqlens"), given, (inputs.q, k_new, v_new, lengths)):
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
        sub = case.replace(batch=1, seqlen_k=n + sq, cache_seqlens=None)
        exp = expected_for(Inputs(inputs.q[b: b + 1], keys, values, inputs.dout[b: b + 1]), sub,
                           backend.capabilities.masked_rows, False, backend.capabilities.accumulation)
        verdict.add("kvcache-reference", compare(f"batch item {b} ({n} cached + {sq} new)", out[b: b + 1], exp.out,
                                                 exp.out_torch_error, exp.out_magnitude, case.torch_dtype,
                                                 FORWARD_MULTIPLE, n + sq, exp.logit_magnitude))
    return verdict


CHECK = Check(NAME, cases, run, needs=NEEDS, feature=CASE_FEATURE, intents=intents)
