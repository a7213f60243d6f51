"""ALiBi biases (-slope_h * |i + seqlen_k - seqlen_q - j|, flash-attn's ``alibi_slopes``, one float32
slope per head): output and gradients match the reference with the same biases."""

from __future__ import annotations

from conformance import grid
from conformance.backend import Backend
from conformance.case import Case
from conformance.checks.check import Check
from conformance.checks.common import against_reference
from conformance.verdict import Verdict

NAME = "alibi"
NEEDS: tuple[str, ...] = ("alibi",)
CASE_FEATURE = "alibi"  # the case feature the check exercises: every case (fuzzed too) has it
BASE = Case(batch=2, seqlen_q=128, seqlen_k=128, nheads=4, head_dim=64, dtype="fp32", alibi=True)


def intents() -> list[grid.Intent]:
    b, it = BASE, grid.intent
    return [
        it("ALiBi", b),
        it("ALiBi with causal", b.replace(causal="bottom_right")),
        it("ALiBi, seqlen_q < seqlen_k, GQA", b.replace(seqlen_q=65, seqlen_k=129, nheads=8, nheads_k=2)),
        it("ALiBi, seqlen_q > seqlen_k, causal, fp16", b.replace(seqlen_q=129, seqlen_k=65, causal="bottom_right",
                                                                 dtype="fp16")),
        it("ALiBi, MQA, bf16", b.replace(dtype="bf16", nheads=8, nheads_k=1)),
        *(it(f"ALiBi, seqlens {sq}/{sk}, {dt}{', causal' if c else ''}",
             b.replace(seqlen_q=sq, seqlen_k=sk, dtype=dt, causal=c, nheads=16), 1, pin=("dtype",))
          for sq, sk in ((257, 257), (64, 2200)) for dt in ("fp16", "bf16") for c in (None, "bottom_right")),
        *(it(f"ALiBi over 2048 tokens, {dt}, head dim {d}",
             b.replace(seqlen_q=2048, seqlen_k=2048, dtype=dt, head_dim=d, causal="bottom_right", nheads=16), 2,
             pin=("dtype",)) for dt in ("fp16", "bf16") for d in (64, 128)),
    ]


def pairwise_intents(caps, device: str, level: int) -> list[grid.Intent]:
    return grid.pairwise(BASE, caps, device, level, feature="alibi") if caps.alibi and level >= 1 else []


def cases(tier: str) -> list[Case]:
    return grid.nominal(intents(), tier)


def run(backend: Backend, case: Case, device: str) -> Verdict:
    verdict = Verdict(NAME, backend.name, case, device)
    against_reference(backend, case, device, verdict, "alibi-reference")
    return verdict


CHECK = Check(NAME, cases, run, needs=NEEDS, feature=CASE_FEATURE, intents=intents, pairwise=pairwise_intents,
              reference="gradients")
