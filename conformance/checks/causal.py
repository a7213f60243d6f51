"""Causal masking: the output matches the reference under the declared alignment (bottom-right or
top-left, which differ when seqlen_q != seqlen_k), fully masked rows return what the backend declares,
and -- needing no tolerance at all -- changing keys and values in a query's future changes nothing of
that query's output, bit for bit."""

from __future__ import annotations

from conformance import grid
from conformance.backend import Backend
from conformance.case import Case
from conformance.checks.check import Check
from conformance.checks.common import masked_keys_do_not_matter
from conformance.checks.forward import output_comparison
from conformance.verdict import Verdict

NAME = "causal"
NEEDS: tuple[str, ...] = ()
CASE_FEATURE = "causal"  # the case feature the check exercises: every case (fuzzed too) has it
BASE = Case(batch=2, seqlen_q=128, seqlen_k=128, nheads=4, head_dim=64, dtype="fp32", causal="bottom_right")


def intents() -> list[grid.Intent]:
    b, it = BASE, grid.intent
    return [
        it("causal, equal seqlens", b),
        *(it(f"{a} alignment, seqlens {sq}/{sk}", b.replace(causal=a, seqlen_q=sq, seqlen_k=sk), pin=("alignment",))
          for a in ("bottom_right", "top_left") for sq, sk in ((65, 129), (129, 65))),
        it("causal with GQA", b.replace(seqlen_q=65, seqlen_k=65, nheads=8, nheads_k=2)),
        it("causal decode: one query", b.replace(seqlen_q=1, seqlen_k=65), pin=("seqlens",)),
        it("fully masked rows (seqlen_q > seqlen_k), fp16", b.replace(seqlen_q=129, seqlen_k=65, dtype="fp16")),
        it("top-left, seqlen_q < seqlen_k, bf16", b.replace(seqlen_q=17, seqlen_k=129, dtype="bf16", causal="top_left"),
           pin=("alignment",)),
        # standard
        *(it(f"{a}, seqlens {sq}/{sk}, {dt}", b.replace(causal=a, seqlen_q=sq, seqlen_k=sk, dtype=dt), 1,
             pin=("alignment", "dtype"))
          for a in ("bottom_right", "top_left") for sq, sk in ((1, 1), (17, 17), (64, 257), (257, 64), (1000, 1000))
          for dt in ("fp32", "bf16")),
        *(it(f"causal, bhsd view, kv heads {kv}", b.replace(seqlen_q=129, seqlen_k=65, nheads=8, nheads_k=kv,
                                                            layout="bhsd"), 1) for kv in (2, 1)),
        it("causal, packed view", b.replace(seqlen_q=65, seqlen_k=65, layout="packed"), 1),
        it("causal, fp64 precision", b.replace(seqlen_q=129, seqlen_k=65, dtype="fp64"), 1, pin=("dtype",)),
        *(it(f"causal offset 2048 keys, {dt}", b.replace(batch=1, seqlen_q=113, seqlen_k=2200, dtype=dt), 1,
             pin=("dtype",)) for dt in ("fp16", "bf16")),
        # full
        *(it(f"{a}, seqlens {sq}/{sk}, {dt}, head dim {d}", b.replace(causal=a, seqlen_q=sq, seqlen_k=sk, dtype=dt,
                                                                     head_dim=d), 2, pin=("alignment", "dtype"))
          for a in ("bottom_right", "top_left") for sq, sk in ((2048, 2048), (113, 2048), (2048, 113))
          for dt in ("fp16", "bf16") for d in (64, 128)),
    ]


def pairwise_intents(caps, device: str, level: int) -> list[grid.Intent]:
    return grid.pairwise(BASE, caps, device, level, causal_only=True) if caps.causal and level >= 1 else []


def cases(tier: str) -> list[Case]:
    return grid.nominal(intents(), tier)


def run(backend: Backend, case: Case, device: str) -> Verdict:
    verdict = Verdict(NAME, backend.name, case, device)
    verdict.add("causal-reference", output_comparison(backend, case, device))
    masked_keys_do_not_matter(backend, case, device, verdict, "future-independence")
    return verdict


CHECK = Check(NAME, cases, run, needs=NEEDS, feature=CASE_FEATURE, intents=intents, pairwise=pairwise_intents,
              reference="output")
