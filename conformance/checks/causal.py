"""Causal masking: the output matches the reference under the declared alignment (bottom-right or
top-left, which differ when seqlen_q != seqlen_k), fully masked rows return what the backend declares,
and -- needing no tolerance at all -- changing keys and values in a query's future changes nothing of
that query's output, bit for bit."""

from __future__ import annotations

import torch

from conformance import reference, tiers
from conformance.backend import Backend, call
from conformance.case import Case
from conformance.checks.forward import output_comparison
from conformance.inputs import make_inputs
from conformance.verdict import Verdict

NAME = "causal"
NEEDS: tuple[str, ...] = ()
CAUSAL_ONLY = True  # whether its cases (and fuzzed ones) must be causal
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


def _future_cut(case: Case) -> tuple[int, torch.Tensor] | None:
    """A key position p and the queries (not fully masked) for which every key >= p is in the future."""
    lo, hi = reference.key_range(case)
    seen_any = lo <= hi
    for row in (case.seqlen_q // 2, 0):
        p = int(hi[row]) + 1
        if 0 < p < case.seqlen_k:
            return p, (hi < p) & seen_any
    return None


def run(backend: Backend, case: Case, device: str) -> Verdict:
    verdict = Verdict(NAME, backend.name, case, device)
    inputs = make_inputs(case, device)
    out = call(backend, inputs.q, inputs.k, inputs.v, case).detach().clone()  # the next call may reuse its buffer
    verdict.add("causal-reference", output_comparison(backend, case, device, out=out))
    cut = _future_cut(case)
    if cut is None:
        return verdict
    p, rows = cut
    with torch.no_grad():  # perturb the future in place, so the layout (views, strides) is kept
        gen = torch.Generator().manual_seed(case.seed + 7)
        for t in (inputs.k, inputs.v):
            t[:, p:] = (torch.randn(t[:, p:].shape, generator=gen) * 8).to(t.device, t.dtype)
    out2 = call(backend, inputs.q, inputs.k, inputs.v, case)
    a, b = out[:, rows.to(out.device)], out2[:, rows.to(out.device)]
    same = (a == b) | (torch.isnan(a) & torch.isnan(b))
    if not bool(same.all()):
        changed = (~same).flatten(2).any(-1).any(0).nonzero().flatten()
        first = int(torch.nonzero(rows).flatten()[int(changed[0])])
        verdict.fail("future-independence",
                     f"keys/values at positions >= {p} are in the future of {int(rows.sum())} query rows; changing "
                     f"them changed the output of {changed.numel()} of those rows, first row {first}")
    return verdict
