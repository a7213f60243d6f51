"""Logit soft-capping (scores -> softcap * tanh(scores / softcap), as in Gemma 2 and flash-attn's
``softcap``): output and gradients match the reference with the same cap."""

from __future__ import annotations

from conformance import grid
from conformance.backend import Backend
from conformance.case import Case
from conformance.checks.check import Check
from conformance.checks.common import against_reference
from conformance.verdict import Verdict

NAME = "softcap"
NEEDS: tuple[str, ...] = ("softcap",)
CASE_FEATURE = "softcap"  # the case feature the check exercises: every case (fuzzed too) has it
BASE = Case(batch=2, seqlen_q=128, seqlen_k=128, nheads=4, head_dim=64, dtype="fp32", softcap=5.0)


def intents() -> list[grid.Intent]:
    b, it = BASE, grid.intent
    return [
        it("soft cap 5", b),
        it("soft cap 30, larger logits", b.replace(softcap=30.0, magnitude=4)),
        it("soft cap with causal, seqlen_q < seqlen_k", b.replace(seqlen_q=65, seqlen_k=129, causal="bottom_right",
                                                                  softcap=2.0)),
        it("soft cap, fp16", b.replace(dtype="fp16", softcap=30.0)),
        it("soft cap, bf16, GQA, large logits", b.replace(dtype="bf16", softcap=50.0, nheads=8, nheads_k=2,
                                                          magnitude=16)),
        *(it(f"soft cap {cap}, seqlens {sq}/{sk}, {dt}{', causal' if c else ''}",
             b.replace(seqlen_q=sq, seqlen_k=sk, softcap=cap, dtype=dt, causal=c), 1, pin=("dtype",))
          for sq, sk in ((257, 257), (129, 2200)) for cap in (1.0, 30.0)
          for dt in ("fp16", "bf16") for c in (None, "bottom_right")),
        *(it(f"soft cap over 2048 tokens, {dt}, head dim {d}",
             b.replace(seqlen_q=2048, seqlen_k=2048, softcap=30.0, dtype=dt, head_dim=d, causal="bottom_right"), 2,
             pin=("dtype",)) for dt in ("fp16", "bf16") for d in (64, 128)),
    ]


def pairwise_intents(caps, device: str, level: int) -> list[grid.Intent]:
    return grid.pairwise(BASE, caps, device, level, feature="softcap") if caps.softcap and level >= 1 else []


def cases(tier: str) -> list[Case]:
    return grid.nominal(intents(), tier)


def run(backend: Backend, case: Case, device: str) -> Verdict:
    verdict = Verdict(NAME, backend.name, case, device)
    against_reference(backend, case, device, verdict, "softcap-reference")
    return verdict


CHECK = Check(NAME, cases, run, needs=NEEDS, feature=CASE_FEATURE, intents=intents, pairwise=pairwise_intents,
              reference="gradients")
