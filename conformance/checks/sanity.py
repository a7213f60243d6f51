"""Sanity: properties every attention kernel owes its caller, whatever its precision.

- finite: no NaN/Inf for finite inputs (except rows the backend declares NaN for);
- deterministic: the same inputs twice give bitwise the same output (unless declared otherwise);
- inputs-unmodified: q, k, v are bitwise unchanged by the call;
- fresh-output: the output shares no storage with the inputs, and a second input set of the same
  shape gets its own correct result (no result cached by shape, no input handed back).
Shape, dtype and device of the output are checked on every call of every check (backend.call).
"""

from __future__ import annotations

import torch

from conformance import grid, judge_memory
from conformance.backend import Backend, call
from conformance.case import Case
from conformance.checks.check import Check
from conformance.checks.common import bitwise_equal
from conformance.checks.forward import output_comparison
from conformance.expected import expected
from conformance.inputs import make_inputs
from conformance.verdict import Verdict

NAME = "sanity"
NEEDS: tuple[str, ...] = ()
CASE_FEATURE = None  # the case feature the check exercises: every case (fuzzed too) has it
BASE = Case(batch=2, seqlen_q=128, seqlen_k=128, nheads=4, head_dim=64, dtype="fp32")


def intents() -> list[grid.Intent]:
    b, it = BASE, grid.intent
    return [
        it("baseline", b),
        it("causal, seqlen_q > seqlen_k", b.replace(seqlen_q=129, seqlen_k=65, causal="bottom_right")),
        it("packed view, fp16", b.replace(seqlen_q=65, seqlen_k=65, dtype="fp16", layout="packed"), pin=("dtype",)),
        it("bhsd view, GQA, bf16", b.replace(seqlen_q=17, seqlen_k=129, dtype="bf16", layout="bhsd", nheads_k=2),
           pin=("dtype",)),
        *(it(f"large logits, {dt}{', top-left causal' if c else ''}", b.replace(dtype=dt, magnitude=16, causal=c), 1,
             pin=("dtype",)) for dt in ("fp16", "bf16", "fp32") for c in (None, "top_left")),
        *(it(f"1024 tokens, {dt}", b.replace(seqlen_q=1024, seqlen_k=1024, dtype=dt), 2, pin=("dtype",))
          for dt in ("fp16", "bf16")),
    ]


def cases(tier: str) -> list[Case]:
    return grid.nominal(intents(), tier)


def run(backend: Backend, case: Case, device: str) -> Verdict:
    verdict = Verdict(NAME, backend.name, case, device)
    caps = backend.capabilities
    inputs = make_inputs(case, device)
    before = judge_memory.copied(inputs)  # out of the kernel's reach (judge_memory.py)
    out = call(backend, inputs.q, inputs.k, inputs.v, case)

    for name in ("q", "k", "v"):
        if not bool(bitwise_equal(getattr(inputs, name), getattr(before, name)).all()):
            verdict.fail("inputs-unmodified", f"the call modified its input {name} in place")
    storages = {t.untyped_storage().data_ptr() for t in (inputs.q, inputs.k, inputs.v)}
    if out.untyped_storage().data_ptr() in storages:
        verdict.fail("fresh-output", "the output shares storage with an input")

    expected_nan = torch.isnan(expected(case, device, caps.masked_rows, False, caps.accumulation).out).to(out.device)
    bad = ~torch.isfinite(out) & ~expected_nan
    if bool(bad.any()):
        verdict.fail("finite", f"{int(bad.sum())} NaN/Inf values in the output for finite inputs")

    out = judge_memory.copied(out)  # the next call may reuse the backend's output buffer, or reach this copy
    if caps.deterministic_forward:
        again = call(backend, inputs.q, inputs.k, inputs.v, case)  # the same tensors: same strides, same path
        same = bitwise_equal(out, again)
        if not bool(same.all()):
            differ = int((~same).sum())
            verdict.fail("deterministic", f"the same inputs twice gave outputs differing in {differ} elements")

    other = case.replace(seed=case.seed + 1)  # same shapes, other numbers
    comparison = output_comparison(backend, other, device, diagnose=False)
    if not comparison.passed:
        first = output_comparison(backend, case, device, out=out)
        if first.passed:
            verdict.fail("fresh-output", "a second input set of the same shape did not get its own result (a result "
                         "cached by shape?): " + comparison.describe())
        else:
            verdict.fail("fresh-output", "wrong on this input too (see the forward check): the first input set's "
                         + first.describe(), getattr(first, "diagnosis", None))
    return verdict


CHECK = Check(NAME, cases, run, needs=NEEDS, feature=CASE_FEATURE, intents=intents, reference="output")
