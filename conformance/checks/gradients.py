"""Gradients: dq, dk, dv from the backend's backward equal float64 autograd within the tolerance rule."""

from __future__ import annotations

import itertools

from conformance import tiers
from conformance.backend import Backend
from conformance.case import Case
from conformance.checks.check import Check
from conformance.checks.common import compare_gradients
from conformance.verdict import Verdict

NAME = "gradients"
NEEDS: tuple[str, ...] = ("backward",)
CASE_FEATURE = None  # the case feature the check exercises: every case (fuzzed too) has it
BASE = Case(batch=2, seqlen_q=65, seqlen_k=65, nheads=4, head_dim=64, dtype="fp32")


def cases(tier: str) -> list[Case]:
    b = BASE
    quick = [
        b,
        b.replace(seqlen_q=17, seqlen_k=129, head_dim=40, nheads_k=2),
        b.replace(seqlen_q=129, seqlen_k=17, head_dim=59, nheads=8, nheads_k=1),
        b.replace(layout="packed"),
        b.replace(seqlen_q=17, seqlen_k=129, layout="bhsd"),
        b.replace(softmax_scale=0.3),
        b.replace(causal="bottom_right", seqlen_k=129),
        b.replace(dtype="fp16"),
        b.replace(dtype="bf16", seqlen_k=129),
        b.replace(dtype="fp64", head_dim=40),
    ]
    standard = [
        *(b.replace(seqlen_q=s, seqlen_k=s) for s in (1, 64, 127, 128, 255)),
        *(b.replace(head_dim=d) for d in (16, 80, 96, 111, 128, 256)),
        *(b.replace(seqlen_k=129, dtype=dt, nheads=8, nheads_k=kv, causal=c)
          for dt, kv, c in itertools.product(("fp16", "bf16", "fp32"), (8, 2, 1), (None, "bottom_right"))),
        *(b.replace(dtype=dt, magnitude=16) for dt in ("fp16", "bf16", "fp32")),
        b.replace(batch=1, seqlen_q=1000, seqlen_k=1000, causal="bottom_right"),
    ]
    full = [
        *(b.replace(seqlen_q=s, seqlen_k=s, head_dim=d, dtype=dt, causal=c)
          for s, d, dt, c in itertools.product((129, 1024), (40, 64, 128, 256), ("fp16", "bf16"),
                                               (None, "bottom_right"))),
    ]
    return tiers.grid(tier, quick, standard, full)


def run(backend: Backend, case: Case, device: str) -> Verdict:
    verdict = Verdict(NAME, backend.name, case, device)
    compare_gradients(backend, case, device, verdict)
    return verdict


CHECK = Check(NAME, cases, run, needs=NEEDS, feature=CASE_FEATURE)
