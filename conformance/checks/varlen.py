"""Variable-length (packed) batches, flash-attn's ``flash_attn_varlen_func``: sequences of different
lengths are concatenated into one (total_tokens, heads, head_dim) tensor delimited by cu_seqlens. Each
sequence's output equals its own reference, and -- needing no tolerance -- no sequence sees another:
changing one sequence's tokens changes no other sequence's output by a single bit."""

from __future__ import annotations

import itertools

import torch

from conformance import grid, judge_memory
from conformance.backend import Backend, call_varlen
from conformance.case import Case
from conformance.checks.check import Check
from conformance.checks.common import bitwise_equal
from conformance.expected import expected_for
from conformance.inputs import Inputs, make_inputs
from conformance.tolerance import FORWARD_MULTIPLE, compare
from conformance.verdict import Verdict

NAME = "varlen"
NEEDS: tuple[str, ...] = ("varlen",)
CASE_FEATURE = "varlen"  # the case feature the check exercises: every case (fuzzed too) has it
BASE = Case(batch=3, seqlen_q=65, seqlen_k=65, nheads=4, head_dim=64, dtype="fp32", varlen=(17, 65, 3))


def intents() -> list[grid.Intent]:
    b, it = BASE, grid.intent
    return [
        it("ragged batch", b),
        it("ragged batch, causal", b.replace(causal="bottom_right")),
        it("ragged batch with a 1-token sequence, GQA", b.replace(batch=4, seqlen_q=128, seqlen_k=128,
                                                                  varlen=(1, 128, 64, 127), nheads=8, nheads_k=2)),
        it("ragged batch, causal, fp16", b.replace(dtype="fp16", causal="bottom_right")),
        it("ragged batch, MQA, bf16", b.replace(dtype="bf16", nheads=8, nheads_k=1)),
        *(it(f"ragged batch {lens}, {dt}{', causal' if c else ''}",
             b.replace(batch=len(lens), seqlen_q=max(lens), seqlen_k=max(lens), varlen=lens, dtype=dt, causal=c), 1,
             pin=("dtype",))
          for lens, dt, c in itertools.product(((1000, 1, 257), (64, 64, 64, 64), (129, 255, 33), (2200, 5, 300)),
                                               ("fp16", "bf16"), (None, "bottom_right"))),
        *(it(f"ragged batch to 2048, {dt}, head dim {d}",
             b.replace(batch=3, seqlen_q=2048, seqlen_k=2048, varlen=(2048, 1000, 17), dtype=dt, head_dim=d), 2,
             pin=("dtype",)) for dt in ("fp16", "bf16") for d in (64, 128)),
    ]


def cases(tier: str) -> list[Case]:
    return grid.nominal(intents(), tier)


def _packed(inputs: Inputs, lens) -> tuple[torch.Tensor, ...]:
    return tuple(torch.cat([t[i, :n] for i, n in enumerate(lens)]) for t in (inputs.q, inputs.k, inputs.v))


def run(backend: Backend, case: Case, device: str) -> Verdict:
    verdict = Verdict(NAME, backend.name, case, device)
    lens = case.varlen
    inputs = make_inputs(case, device)
    q, k, v = _packed(inputs, lens)
    bounds = [0, *itertools.accumulate(lens)]
    cu_seqlens = torch.tensor(bounds, dtype=torch.int32, device=q.device)
    out = judge_memory.copied(call_varlen(backend, q, k, v, cu_seqlens, max(lens), case))
    for i, n in enumerate(lens):
        sub = case.replace(batch=1, seqlen_q=n, seqlen_k=n, varlen=None)
        own = Inputs(*(t[i: i + 1, :n] for t in (inputs.q, inputs.k, inputs.v, inputs.dout)))
        exp = expected_for(own, sub, backend.capabilities.masked_rows, False, backend.capabilities.accumulation)
        verdict.add("varlen-reference", compare(f"sequence {i} (length {n})", out[bounds[i]: bounds[i + 1]].unsqueeze(0),
                                               exp.out, exp.out_torch_error, exp.out_magnitude, case.torch_dtype,
                                               FORWARD_MULTIPLE, n, exp.logit_magnitude, at=(0, bounds[i])))
    changed = len(lens) // 2  # replace this sequence's tokens; every other sequence must be untouched
    with torch.no_grad():
        gen = torch.Generator().manual_seed(case.seed + 11)
        for t in (q, k, v):
            part = t[bounds[changed]: bounds[changed + 1]]
            part.copy_((torch.randn(part.shape, generator=gen) * 8).to(part.device, part.dtype))
    again = call_varlen(backend, q, k, v, cu_seqlens, max(lens), case)
    others = torch.ones(bounds[-1], dtype=torch.bool, device=out.device)
    others[bounds[changed]: bounds[changed + 1]] = False
    same = bitwise_equal(out[others], again[others])
    if not bool(same.all()):
        token = int(others.nonzero().flatten()[int((~same).flatten(1).any(1).nonzero()[0])])
        seq = next(i for i in range(len(lens)) if bounds[i] <= token < bounds[i + 1])
        verdict.fail("sequence-isolation", f"changing sequence {changed}'s tokens changed the output of sequence "
                                           f"{seq} (first at packed token {token})")
    return verdict


CHECK = Check(NAME, cases, run, needs=NEEDS, feature=CASE_FEATURE, intents=intents)
