"""Forward equivalence: the output equals the float64 reference within the tolerance rule."""

from __future__ import annotations

import dataclasses
import itertools
import math

import torch

from conformance import diagnosis, grid
from conformance.backend import Backend, call
from conformance.case import Case
from conformance.checks.check import Check
from conformance.expected import expected, expected_for
from conformance.inputs import make_inputs
from conformance.tolerance import FORWARD_MULTIPLE, Comparison, compare
from conformance.verdict import Verdict

NAME = "forward"
NEEDS: tuple[str, ...] = ()
CASE_FEATURE = None  # the case feature the check exercises: every case (fuzzed too) has it
BASE = Case(batch=2, seqlen_q=128, seqlen_k=128, nheads=4, head_dim=64, dtype="fp32")


def intents() -> list[grid.Intent]:
    """What each case is for; realised per backend by grid.realise (dtype, head dim, seqlens adapt)."""
    b, it = BASE, grid.intent
    return [
        it("fp32 baseline", b, pin=("dtype",)),
        it("a single query and key", b.replace(batch=1, seqlen_q=1, seqlen_k=1), pin=("seqlens",)),
        it("short odd seqlen, head dim 40", b.replace(seqlen_q=17, seqlen_k=17, head_dim=40)),
        it("odd head dim 59", b.replace(seqlen_q=65, seqlen_k=65, head_dim=59), pin=("head_dim",)),
        it("seqlen one block past a boundary", b.replace(batch=1, seqlen_q=257, seqlen_k=257, head_dim=16)),
        it("seqlen_q < seqlen_k", b.replace(seqlen_q=17, seqlen_k=129)),
        it("seqlen_q > seqlen_k", b.replace(seqlen_q=129, seqlen_k=17)),
        it("head dim 128", b.replace(seqlen_q=65, seqlen_k=65, head_dim=128)),
        it("head dim 256", b.replace(batch=1, seqlen_q=64, seqlen_k=64, head_dim=256), pin=("head_dim",)),
        it("GQA 8:2", b.replace(seqlen_q=65, seqlen_k=65, nheads=8, nheads_k=2)),
        it("MQA, seqlen_q < seqlen_k", b.replace(seqlen_q=65, seqlen_k=129, nheads=8, nheads_k=1)),
        it("custom softmax scale", b.replace(seqlen_q=65, seqlen_k=65, softmax_scale=0.3)),
        it("packed qkv view (non-contiguous)", b.replace(seqlen_q=65, seqlen_k=65, nheads_k=2, layout="packed")),
        it("bhsd transposed view (non-contiguous)", b.replace(seqlen_q=17, seqlen_k=129, layout="bhsd")),
        it("large logits (exp overflows without max subtraction)", b.replace(seqlen_q=65, seqlen_k=65, magnitude=16)),
        it("fp16, seqlen_q < seqlen_k", b.replace(seqlen_q=65, seqlen_k=129, dtype="fp16")),
        it("bf16, seqlen_q > seqlen_k, head dim 40", b.replace(seqlen_q=129, seqlen_k=65, head_dim=40, dtype="bf16")),
        it("fp64 precision, odd head dim", b.replace(seqlen_q=65, seqlen_k=65, head_dim=59, dtype="fp64"),
           pin=("dtype",)),
        *(it(f"long {dt} sum (2048 keys)", b.replace(batch=1, seqlen_q=2048, seqlen_k=2048, nheads=1, nheads_k=1, dtype=dt),
             pin=("dtype",)) for dt in ("fp16", "bf16")),
        # standard
        *(it(f"block boundary: seqlen {s}", b.replace(seqlen_q=s, seqlen_k=s), 1) for s in (63, 64, 127, 255, 256)),
        *(it(f"seqlens {sq}/{sk}", b.replace(seqlen_q=sq, seqlen_k=sk), 1)
          for sq, sk in ((1, 257), (257, 1), (64, 1000), (1000, 65))),
        *(it(f"head dim {d}", b.replace(seqlen_q=65, seqlen_k=65, head_dim=d), 1, pin=("head_dim",))
          for d in (16, 80, 96, 111, 256)),
        *(it(f"packed view, {dt}", b.replace(seqlen_q=128, seqlen_k=128, dtype=dt, layout="packed"), 1, pin=("dtype",))
          for dt in ("fp16", "bf16", "fp64")),
        *(it(f"large logits, {dt}", b.replace(seqlen_q=65, seqlen_k=65, dtype=dt, magnitude=16), 1, pin=("dtype",))
          for dt in ("fp16", "bf16", "fp64")),
        *(it(f"scale {sc}, {dt}", b.replace(seqlen_q=65, seqlen_k=129, dtype=dt, softmax_scale=sc), 1, pin=("dtype",))
          for dt in ("fp16", "bf16") for sc in (0.05, 1.0)),
        it("batch 3, 1000 tokens", b.replace(batch=3, seqlen_q=1000, seqlen_k=1000), 1),
        *(it(f"long {dt} sum (4096 keys){', causal' if c else ''}",
             b.replace(batch=1, seqlen_q=4096, seqlen_k=4096, nheads=1, nheads_k=1, dtype=dt, causal=c), 1, pin=("dtype",))
          for dt in ("fp16", "bf16") for c in (None, "bottom_right")),
        it("decode against 8192 keys, bf16", b.replace(batch=1, seqlen_q=1, seqlen_k=8192, nheads=8, nheads_k=2,
                                                      dtype="bf16"), 1, pin=("dtype",)),
        # full
        *(it(f"seqlen {s}, head dim {d}, {dt}", b.replace(seqlen_q=s, seqlen_k=s, head_dim=d, dtype=dt), 2,
             pin=("dtype", "head_dim"))
          for s, d, dt in itertools.product((1, 17, 129, 1024), (16, 40, 59, 64, 80, 96, 111, 128, 256),
                                            ("fp16", "bf16", "fp32"))),
        *(it(f"GQA seqlens {sq}/{sk}, {dt}", b.replace(batch=1, seqlen_q=sq, seqlen_k=sk, nheads=8, nheads_k=2,
                                                      dtype=dt), 2, pin=("dtype",))
          for sq, sk in ((2048, 2048), (1, 2048), (2048, 113)) for dt in ("fp16", "bf16")),
    ]


def pairwise_intents(caps, device: str, level: int) -> list[grid.Intent]:
    return grid.pairwise(BASE, caps, device, level)


def cases(tier: str) -> list[Case]:
    return grid.nominal(intents(), tier)


def output_comparison(backend: Backend, case: Case, device: str, out=None, diagnose: bool = True) -> Comparison:
    """Run the backend on the case's inputs (unless ``out`` is given) and hold it to the reference; a
    failed comparison carries the diagnosis of the output (diagnosis.py) unless not ``diagnose``."""
    called = out is None
    if called:
        inputs = make_inputs(case, device)
        out = call(backend, inputs.q, inputs.k, inputs.v, case)
    caps = backend.capabilities
    exp = expected(case, device, caps.masked_rows, False, caps.accumulation)
    comparison, bounds = _compare(out, exp, case)
    if comparison.passed or not diagnose:
        return comparison
    found = diagnosis.diagnose_output(case, out, caps.masked_rows, comparison, bounds)
    if found is None and called:
        found = _second_opinion(backend, case, device, exp, comparison, inputs)
    return diagnosis.diagnosed(comparison, found)


def _compare(out, exp, case: Case) -> tuple[Comparison, torch.Tensor | None]:
    """The rule over the whole output, or, under a causal mask or window, over each class of rows that
    see like numbers of keys (expected.RowClass): the comparison nearest its bound (or furthest past
    it), and then each row's bound, (1, seqlen_q, 1, 1), for the diagnosis."""
    n = max(case.seqlen_q, case.seqlen_k)
    if exp.out_classes is None:
        return compare("out", out, exp.out, exp.out_torch_error, exp.out_magnitude, case.torch_dtype,
                       FORWARD_MULTIPLE, n, exp.logit_magnitude), None
    out = out.detach().to(exp.out.device)
    bounds = torch.empty(1, case.seqlen_q, 1, 1, dtype=torch.float64)
    parts = []
    for c in exp.out_classes:
        rows = f"query rows seeing {c.fewest}-{c.most} keys" if c.fewest < c.most else \
            f"query rows seeing {c.most} key{'s' if c.most != 1 else ''}" if c.most else "query rows seeing no key"
        part = compare(f"out ({rows})", out[:, c.rows], exp.out[:, c.rows], c.torch_error, c.magnitude,
                       case.torch_dtype, FORWARD_MULTIPLE, n, exp.logit_magnitude)
        if part.worst:  # its query row within the output, not within the class
            part = dataclasses.replace(part, worst=(part.worst[0], int(c.rows[part.worst[1]]), *part.worst[2:]))
        parts.append(part)
        bounds[:, c.rows.cpu()] = parts[-1].bound
    return max(parts, key=lambda c: math.inf if c.nonfinite else c.error / max(c.bound, 1e-300)), bounds


def _second_opinion(backend: Backend, case: Case, device: str, exp, first: Comparison, seen):
    """A failure no hypothesis explains is checked once more before it is reported: the reference is
    recomputed from freshly drawn inputs (a difference is the suite's own bug, raised as such); the
    inputs the first call had (``seen``) are compared with them (a difference is said: the kernel wrote
    into them, or they did not reach it intact); and the kernel is called again on them. A second result
    within the bound is said: the first was transient (the verdict stays a failure: a kernel that is
    sometimes wrong is wrong)."""
    caps = backend.capabilities
    inputs = make_inputs(case, device)
    again = expected_for(inputs.clone(), case, caps.masked_rows, False, caps.accumulation)
    if not torch.equal(again.out, exp.out) or again.out_torch_error != exp.out_torch_error:
        raise RuntimeError(f"the reference for {case.id} changed between two computations: the suite is at fault")
    changed = seen.differing(inputs, ("q", "k", "v"))
    if changed:
        which = f"inputs {', '.join(changed)} differ" if len(changed) > 1 else f"input {changed[0]} differs"
        return diagnosis.Diagnosis("inputs changed", f"after the call its {which} from the case's: the kernel "
                                                     "wrote into them, or they did not reach it intact")
    second, _ = _compare(call(backend, inputs.q, inputs.k, inputs.v, case), exp, case)
    if not second.passed:
        return None
    return diagnosis.Diagnosis("transient", f"a second call on fresh copies of the same inputs was within the bound "
                                            f"(error {second.error:.3e}); the first result ({first.error:.3e}) was not")


def run(backend: Backend, case: Case, device: str) -> Verdict:
    verdict = Verdict(NAME, backend.name, case, device)
    verdict.add("forward", output_comparison(backend, case, device))
    return verdict


CHECK = Check(NAME, cases, run, needs=NEEDS, feature=CASE_FEATURE, intents=intents, pairwise=pairwise_intents,
              reference="output")
