"""Gradients: dq, dk, dv from the backend's backward equal float64 autograd within the tolerance rule."""

from __future__ import annotations

import itertools

from conformance import grid
from conformance.backend import Backend
from conformance.case import Case
from conformance.checks.check import Check
from conformance.checks.common import compare_gradients
from conformance.verdict import Verdict

NAME = "gradients"
NEEDS: tuple[str, ...] = ("backward",)
CASE_FEATURE = None  # the case feature the check exercises: every case (fuzzed too) has it
BASE = Case(batch=2, seqlen_q=65, seqlen_k=65, nheads=4, head_dim=64, dtype="fp32")


def intents() -> list[grid.Intent]:
    b, it = BASE, grid.intent
    return [
        it("fp32 baseline", b, pin=("dtype",)),
        it("seqlen_q < seqlen_k, GQA, head dim 40", b.replace(seqlen_q=17, seqlen_k=129, head_dim=40, nheads_k=2)),
        it("seqlen_q > seqlen_k, MQA, odd head dim", b.replace(seqlen_q=129, seqlen_k=17, head_dim=59, nheads=8,
                                                               nheads_k=1), pin=("head_dim",)),
        it("packed qkv view", b.replace(layout="packed")),
        it("bhsd view, seqlen_q < seqlen_k", b.replace(seqlen_q=17, seqlen_k=129, layout="bhsd")),
        it("custom softmax scale", b.replace(softmax_scale=0.3)),
        it("causal, seqlen_q < seqlen_k", b.replace(causal="bottom_right", seqlen_k=129)),
        it("fp16", b.replace(dtype="fp16"), pin=("dtype",)),
        it("bf16, seqlen_q < seqlen_k", b.replace(dtype="bf16", seqlen_k=129), pin=("dtype",)),
        it("fp64 precision", b.replace(dtype="fp64", head_dim=40), pin=("dtype",)),
        it("long bf16 sums (1024 keys)", b.replace(batch=1, seqlen_q=1024, seqlen_k=1024, nheads=1, nheads_k=1,
                                                  dtype="bf16"), pin=("dtype",)),
        # standard
        *(it(f"block boundary: seqlen {s}", b.replace(seqlen_q=s, seqlen_k=s), 1) for s in (1, 64, 127, 128, 255)),
        *(it(f"head dim {d}", b.replace(head_dim=d), 1, pin=("head_dim",)) for d in (16, 80, 96, 111, 128, 256)),
        *(it(f"large logits, {dt}", b.replace(dtype=dt, magnitude=16), 1, pin=("dtype",))
          for dt in ("fp16", "bf16", "fp32")),
        it("causal, 1000 tokens", b.replace(batch=1, seqlen_q=1000, seqlen_k=1000, causal="bottom_right"), 1),
        *(it(f"long {dt} sums (4096 keys){', causal' if c else ''}",
             b.replace(batch=1, seqlen_q=4096, seqlen_k=4096, nheads=1, nheads_k=1, dtype=dt, causal=c), 1, pin=("dtype",))
          for dt in ("fp16", "bf16") for c in (None, "bottom_right")),
        # full
        *(it(f"seqlen {s}, head dim {d}, {dt}{', causal' if c else ''}",
             b.replace(seqlen_q=s, seqlen_k=s, head_dim=d, dtype=dt, causal=c), 2, pin=("dtype", "head_dim"))
          for s, d, dt, c in itertools.product((129, 1024), (40, 64, 128, 256), ("fp16", "bf16"),
                                               (None, "bottom_right"))),
    ]


def pairwise_intents(caps, device: str, level: int) -> list[grid.Intent]:
    return grid.pairwise(BASE, caps, device, level)


def cases(tier: str) -> list[Case]:
    return grid.nominal(intents(), tier)


def run(backend: Backend, case: Case, device: str) -> Verdict:
    verdict = Verdict(NAME, backend.name, case, device)
    compare_gradients(backend, case, device, verdict)
    return verdict


CHECK = Check(NAME, cases, run, needs=NEEDS, feature=CASE_FEATURE, intents=intents, pairwise=pairwise_intents,
              reference="gradients")
