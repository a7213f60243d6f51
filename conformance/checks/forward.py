"""Forward equivalence: the output equals the float64 reference within the tolerance rule."""

from __future__ import annotations

import itertools

from conformance import tiers
from conformance.backend import Backend, call
from conformance.case import Case
from conformance.checks.check import Check
from conformance.expected import expected
from conformance.inputs import make_inputs
from conformance.tolerance import FORWARD_MULTIPLE, Comparison, compare
from conformance.verdict import Verdict

NAME = "forward"
NEEDS: tuple[str, ...] = ()
CASE_FEATURE = None  # the case feature the check exercises: every case (fuzzed too) has it
BASE = Case(batch=2, seqlen_q=128, seqlen_k=128, nheads=4, head_dim=64, dtype="fp32")


def cases(tier: str) -> list[Case]:
    b = BASE
    quick = [
        b,
        b.replace(batch=1, seqlen_q=1, seqlen_k=1),
        b.replace(seqlen_q=17, seqlen_k=17, head_dim=40),
        b.replace(seqlen_q=65, seqlen_k=65, head_dim=59),
        b.replace(batch=1, seqlen_q=257, seqlen_k=257, head_dim=16),
        b.replace(seqlen_q=17, seqlen_k=129),
        b.replace(seqlen_q=129, seqlen_k=17),
        b.replace(seqlen_q=65, seqlen_k=65, head_dim=128),
        b.replace(batch=1, seqlen_q=64, seqlen_k=64, head_dim=256),
        b.replace(seqlen_q=65, seqlen_k=65, nheads=8, nheads_k=2),
        b.replace(seqlen_q=65, seqlen_k=129, nheads=8, nheads_k=1),
        b.replace(seqlen_q=65, seqlen_k=65, softmax_scale=0.3),
        b.replace(seqlen_q=65, seqlen_k=65, nheads_k=2, layout="packed"),
        b.replace(seqlen_q=17, seqlen_k=129, layout="bhsd"),
        b.replace(seqlen_q=65, seqlen_k=65, magnitude=16),
        b.replace(seqlen_q=65, seqlen_k=129, dtype="fp16"),
        b.replace(seqlen_q=129, seqlen_k=65, head_dim=40, dtype="bf16"),
        b.replace(seqlen_q=65, seqlen_k=65, head_dim=59, dtype="fp64"),
    ]
    standard = [
        *(b.replace(seqlen_q=s, seqlen_k=s) for s in (63, 64, 127, 255, 256)),
        *(b.replace(seqlen_q=sq, seqlen_k=sk) for sq, sk in ((1, 257), (257, 1), (64, 1000), (1000, 65))),
        *(b.replace(seqlen_q=65, seqlen_k=65, head_dim=d) for d in (16, 80, 96, 111, 256)),
        *(b.replace(seqlen_q=65, seqlen_k=129, dtype=dt, nheads=8, nheads_k=kv, layout=lay)
          for dt, kv, lay in itertools.product(("fp16", "bf16", "fp32"), (8, 2, 1), ("contiguous", "bhsd"))),
        *(b.replace(seqlen_q=128, seqlen_k=128, dtype=dt, layout="packed") for dt in ("fp16", "bf16", "fp64")),
        *(b.replace(seqlen_q=65, seqlen_k=65, dtype=dt, magnitude=16) for dt in ("fp16", "bf16", "fp64")),
        *(b.replace(seqlen_q=65, seqlen_k=129, dtype=dt, softmax_scale=s) for dt in ("fp16", "bf16") for s in (0.05, 1.0)),
        b.replace(batch=3, seqlen_q=1000, seqlen_k=1000, head_dim=64),
    ]
    full = [
        *(b.replace(seqlen_q=s, seqlen_k=s, head_dim=d, dtype=dt)
          for s, d, dt in itertools.product((1, 17, 129, 1024), (16, 40, 59, 64, 80, 96, 111, 128, 256),
                                            ("fp16", "bf16", "fp32"))),
        *(b.replace(batch=1, seqlen_q=sq, seqlen_k=sk, nheads=8, nheads_k=2, dtype=dt)
          for sq, sk in ((2048, 2048), (1, 2048), (2048, 113)) for dt in ("fp16", "bf16")),
    ]
    return tiers.grid(tier, quick, standard, full)


def output_comparison(backend: Backend, case: Case, device: str, out=None) -> Comparison:
    """Run the backend on the case's inputs (unless ``out`` is given) and hold it to the reference."""
    if out is None:
        inputs = make_inputs(case, device)
        out = call(backend, inputs.q, inputs.k, inputs.v, case)
    exp = expected(case, device, backend.capabilities.masked_rows, False)
    return compare("out", out, exp.out, exp.out_torch_error, exp.out_magnitude, case.torch_dtype, FORWARD_MULTIPLE,
                   max(case.seqlen_q, case.seqlen_k))


def run(backend: Backend, case: Case, device: str) -> Verdict:
    verdict = Verdict(NAME, backend.name, case, device)
    verdict.add("forward", output_comparison(backend, case, device))
    return verdict


CHECK = Check(NAME, cases, run, needs=NEEDS, feature=CASE_FEATURE)
