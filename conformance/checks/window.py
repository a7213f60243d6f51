"""Sliding window (flash-attn's ``window_size=(left, right)``, -1 unbounded): the output and gradients
match the reference under the same mask, and keys outside a query's window do not change its output
by a single bit."""

from __future__ import annotations

from conformance import grid
from conformance.backend import Backend
from conformance.case import Case
from conformance.checks.check import Check
from conformance.checks.common import against_reference, masked_keys_do_not_matter
from conformance.verdict import Verdict

NAME = "window"
NEEDS: tuple[str, ...] = ("window",)
CASE_FEATURE = "window"  # the case feature the check exercises: every case (fuzzed too) has it
BASE = Case(batch=2, seqlen_q=128, seqlen_k=128, nheads=4, head_dim=64, dtype="fp32", window=(16, 0))


def intents() -> list[grid.Intent]:
    b, it = BASE, grid.intent
    return [
        it("left window", b),
        it("symmetric window", b.replace(window=(8, 8))),
        it("window with causal", b.replace(window=(32, -1), causal="bottom_right")),
        it("window, seqlen_q < seqlen_k", b.replace(seqlen_q=65, seqlen_k=129, window=(10, 5))),
        it("window, seqlen_q > seqlen_k", b.replace(seqlen_q=129, seqlen_k=65, window=(3, 3))),
        it("unbounded right edge, seqlen_q > seqlen_k, bf16", b.replace(seqlen_q=129, seqlen_k=65, window=(16, -1),
                                                                      dtype="bf16")),
        it("unbounded left edge, fp16", b.replace(seqlen_q=129, seqlen_k=129, window=(-1, 7), dtype="fp16")),
        it("zero-width window with GQA, bf16", b.replace(seqlen_q=65, seqlen_k=65, window=(0, 0), dtype="bf16",
                                                        nheads=8, nheads_k=2)),
        *(it(f"window {w}, seqlens {sq}/{sk}, {dt}{', causal' if c else ''}",
             b.replace(seqlen_q=sq, seqlen_k=sk, window=w, dtype=dt, causal=c), 1, pin=("dtype",))
          for sq, sk in ((257, 257), (64, 1000)) for w in ((1, 0), (64, 64), (255, -1))
          for dt in ("fp16", "bf16") for c in (None, "bottom_right")),
        *(it(f"window {w} over 2048 tokens, {dt}, head dim {d}",
             b.replace(seqlen_q=2048, seqlen_k=2048, window=(w, 0), dtype=dt, head_dim=d, causal="bottom_right"), 2,
             pin=("dtype",)) for w in (128, 1024) for dt in ("fp16", "bf16") for d in (64, 128)),
    ]


def pairwise_intents(caps, device: str, level: int) -> list[grid.Intent]:
    return grid.pairwise(BASE, caps, device, level, feature="window") if caps.window and level >= 1 else []


def cases(tier: str) -> list[Case]:
    return grid.nominal(intents(), tier)


def run(backend: Backend, case: Case, device: str) -> Verdict:
    verdict = Verdict(NAME, backend.name, case, device)
    against_reference(backend, case, device, verdict, "window-reference")
    masked_keys_do_not_matter(backend, case, device, verdict, "outside-window-independence")
    return verdict


CHECK = Check(NAME, cases, run, needs=NEEDS, feature=CASE_FEATURE, intents=intents, pairwise=pairwise_intents,
              reference="gradients")
