"""Causal masking: the output matches the reference under the declared alignment (bottom-right or
top-left, which differ when seqlen_q != seqlen_k), fully masked rows return what the backend declares,
and -- needing no tolerance at all -- changing keys and values in a query's future changes nothing of
that query's output, bit for bit."""

from __future__ import annotations

from conformance import tiers
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


def cases(tier: str) -> list[Case]:
    b = BASE
    quick = [
        b,
        *(b.replace(causal=a, seqlen_q=sq, seqlen_k=sk)
          for a in ("bottom_right", "top_left") for sq, sk in ((65, 129), (129, 65))),
        b.replace(seqlen_q=65, seqlen_k=65, nheads=8, nheads_k=2),
        b.replace(seqlen_q=1, seqlen_k=65),
        b.replace(seqlen_q=129, seqlen_k=65, dtype="fp16"),
        b.replace(seqlen_q=17, seqlen_k=129, dtype="bf16", causal="top_left"),
    ]
    standard = [
        *(b.replace(causal=a, seqlen_q=sq, seqlen_k=sk, dtype=dt)
          for a in ("bottom_right", "top_left") for sq, sk in ((1, 1), (17, 17), (64, 257), (257, 64), (1000, 1000))
          for dt in ("fp32", "bf16")),
        *(b.replace(seqlen_q=129, seqlen_k=65, nheads=8, nheads_k=kv, layout="bhsd") for kv in (2, 1)),
        b.replace(seqlen_q=65, seqlen_k=65, layout="packed"),
        b.replace(seqlen_q=129, seqlen_k=65, dtype="fp64"),
    ]
    full = [b.replace(causal=a, seqlen_q=sq, seqlen_k=sk, dtype=dt, head_dim=d)
            for a in ("bottom_right", "top_left") for sq, sk in ((2048, 2048), (113, 2048), (2048, 113))
            for dt in ("fp16", "bf16") for d in (64, 128)]
    return tiers.grid(tier, quick, standard, full)


def run(backend: Backend, case: Case, device: str) -> Verdict:
    verdict = Verdict(NAME, backend.name, case, device)
    verdict.add("causal-reference", output_comparison(backend, case, device))
    masked_keys_do_not_matter(backend, case, device, verdict, "future-independence")
    return verdict


CHECK = Check(NAME, cases, run, needs=NEEDS, feature=CASE_FEATURE)
