"""Backward determinism: a backend that declares ``deterministic_backward`` is called with
``deterministic=True`` (flash-attn's flag) and must give bitwise the same dq, dk, dv on every repeat;
for any other backend the run-to-run spread is measured and reported as a property, not judged."""

from __future__ import annotations

import torch

from conformance import grid, judge_memory
from conformance.backend import Backend, call
from conformance.case import Case
from conformance.checks.check import Check
from conformance.checks.common import bitwise_equal
from conformance.expected import GRAD_NAMES
from conformance.inputs import make_inputs
from conformance.verdict import Verdict

NAME = "determinism"
NEEDS: tuple[str, ...] = ("backward",)
CASE_FEATURE = None  # the case feature the check exercises: every case (fuzzed too) has it
BASE = Case(batch=2, seqlen_q=257, seqlen_k=257, nheads=4, head_dim=64, dtype="fp32")
REPEATS = 4


def intents() -> list[grid.Intent]:
    b, it = BASE, grid.intent
    return [
        it("backward repeat", b),
        it("backward repeat, causal, bf16", b.replace(causal="bottom_right", dtype="bf16")),
        it("backward repeat, GQA, fp16", b.replace(dtype="fp16", nheads=8, nheads_k=2)),
        *(it(f"backward repeat, 1024 tokens, {dt}{', causal' if c else ''}",
             b.replace(seqlen_q=1024, seqlen_k=1024, dtype=dt, causal=c), 1, pin=("dtype",))
          for dt in ("fp16", "bf16") for c in (None, "bottom_right")),
        *(it(f"backward repeat, 4096 tokens, {dt}, head dim {d}",
             b.replace(seqlen_q=4096, seqlen_k=4096, dtype=dt, head_dim=d), 2, pin=("dtype",))
          for dt in ("fp16", "bf16") for d in (64, 128)),
    ]


def cases(tier: str) -> list[Case]:
    return grid.nominal(intents(), tier)


def run(backend: Backend, case: Case, device: str) -> Verdict:
    verdict = Verdict(NAME, backend.name, case, device)
    claimed = backend.capabilities.deterministic_backward
    extra = {"deterministic": True} if claimed else {}
    inputs = make_inputs(case, device, requires_grad=True)
    runs = []
    for _ in range(REPEATS):
        out = call(backend, inputs.q, inputs.k, inputs.v, case, **extra)
        runs.append([judge_memory.copied(g) for g in torch.autograd.grad(out, (inputs.q, inputs.k, inputs.v), inputs.dout)])
    spread = {name: max(float((r[i].double() - runs[0][i].double()).abs().max()) for r in runs[1:])
              for i, name in enumerate(GRAD_NAMES)}
    verdict.measurements["backward_spread"] = spread
    if claimed:
        for i, name in enumerate(GRAD_NAMES):
            if not all(bool(bitwise_equal(r[i], runs[0][i]).all()) for r in runs[1:]):
                verdict.fail("backward-deterministic", f"{name} differs between {REPEATS} runs with deterministic=True "
                                                       f"(largest difference {spread[name]:.3e})")
    return verdict


CHECK = Check(NAME, cases, run, needs=NEEDS, feature=CASE_FEATURE, intents=intents)
