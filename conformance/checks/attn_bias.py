"""Arbitrary masks and additive bias, SDPA's ``attn_mask``: one ``attn_bias`` tensor broadcastable to
(batch, nheads, seqlen_q, seqlen_k), bool keeping where True, float added to the scaled scores. Key-padding
masks (batch, 1, 1, seqlen_k), per-head biases (1, nheads, seqlen_q, seqlen_k), full ones, shared ones;
rows the mask leaves no key (the declared masked-row value), a bias of large magnitude (a per-row offset
far beyond exp's float32 range: only a kernel whose running max includes the bias survives it).

The bias meets each other feature (softcap, window, ALiBi, causal; dropout in the dropout check) where
the backend declares both, and broadcasts over every dimension, heads-but-not-queries (., nheads, 1,
seqlen_k) included.

Properties: the output and dq, dk, dv against the float64 reference with the same tensor; with a boolean
mask, keys and values masked for every query of a batch item are changed and that item's output must not
change by a bit; the gradient of a float bias (``bias_grad``) against float64 autograd; the same bias
passed expanded (stride 0 where it broadcasts) and as a strided view gives the reference's output too
(attn-bias-layout, where ``noncontiguous`` is declared); the bias tensor unmodified by a call, and by a
forward and backward (inputs-unmodified)."""

from __future__ import annotations

import dataclasses

import torch

from conformance import grid, judge_memory, reference
from conformance.backend import Backend, checked_output, invoke, kwargs_for
from conformance.case import Case
from conformance.checks.check import Check
from conformance.checks.common import against_reference, bitwise_equal
from conformance.checks.forward import output_comparison
from conformance.expected import gradient_precisions
from conformance.inputs import attn_bias, make_inputs
from conformance.tolerance import GRADIENT_MULTIPLE, compare, max_abs_error
from conformance.verdict import Verdict

NAME = "attn_bias"
NEEDS: tuple[str, ...] = ()  # the case feature itself asks for the attn_bias capability
CASE_FEATURE = "attn_bias"  # the case feature the check exercises: every case (fuzzed too) has it
BASE = Case(batch=2, seqlen_q=65, seqlen_k=129, nheads=4, head_dim=64, dtype="fp32", attn_bias="add.1hqk")


def intents() -> list[grid.Intent]:
    b, it = BASE, grid.intent
    return [
        it("key-padding mask (batch, 1, 1, seqlen_k), batch 3, GQA", b.replace(batch=3, nheads=8, nheads_k=2,
                                                                              attn_bias="keep.b11k")),
        it("per-head float bias (1, nheads, seqlen_q, seqlen_k)", b),
        it("full float bias, causal", b.replace(attn_bias="add.bhqk", causal="bottom_right")),
        it("bool mask shared by batch and heads, causal, seqlen_q > seqlen_k",
           b.replace(seqlen_q=129, seqlen_k=65, attn_bias="keep.11qk", causal="bottom_right")),
        it("rows fully masked by a per-head mask", b.replace(attn_bias="rows.bhqk")),
        it("a batch item whose keys are all padding", b.replace(batch=3, attn_bias="rows.b11k")),
        it("large-magnitude bias (batch, 1, seqlen_q, seqlen_k), fp16", b.replace(attn_bias="big.b1qk", dtype="fp16")),
        it("row-constant offsets of +-100..250 (batch, nheads, seqlen_q, 1), bf16",
           b.replace(attn_bias="big.bhq1", dtype="bf16")),
        it("per-batch float bias (batch, 1, seqlen_q, seqlen_k), custom scale, bf16",
           b.replace(attn_bias="add.b1qk", softmax_scale=0.3, dtype="bf16")),
        it("key-padding mask, fp16, decode", b.replace(seqlen_q=1, attn_bias="keep.b11k", dtype="fp16")),
        it("per-head key bias broadcast over queries (batch, nheads, 1, seqlen_k)", b.replace(attn_bias="add.bh1k")),
        # the bias beside each other feature, where the backend declares both
        it("per-head float bias with softcap", b.replace(softcap=5.0)),
        it("key-padding mask with a sliding window", b.replace(attn_bias="keep.b11k", window=(24, 8))),
        it("per-head float bias with ALiBi", b.replace(alibi=True)),
        # standard
        *(it(f"{spec} bias, seqlens {sq}/{sk}, {dt}{', causal' if c else ''}",
             b.replace(seqlen_q=sq, seqlen_k=sk, dtype=dt, causal=c, attn_bias=spec), 1, pin=("dtype",))
          for spec, sq, sk in (("add.bhqk", 257, 257), ("keep.b11k", 64, 1000), ("rows.1hqk", 1000, 257),
                               ("big.11qk", 128, 128))
          for dt in ("fp16", "bf16") for c in (None, "bottom_right")),
        it("float bias, fp64 precision", b.replace(dtype="fp64", attn_bias="add.bhqk"), 1, pin=("dtype",)),
        it("key-padding mask, bhsd view", b.replace(layout="bhsd", attn_bias="keep.b11k"), 1),
        it("large bias, large logits", b.replace(magnitude=16, attn_bias="big.1hqk"), 1),
        it("bool mask (1, nheads, 1, seqlen_k), GQA", b.replace(attn_bias="keep.1h1k", nheads=8, nheads_k=2), 1),
        it("full float bias with softcap, window and ALiBi, causal",
           b.replace(attn_bias="add.bhqk", softcap=30.0, window=(48, 0), alibi=True, causal="bottom_right"), 1),
        it("rows fully masked by the mask, softcap and a window", b.replace(attn_bias="rows.b1qk", softcap=5.0,
                                                                           window=(16, 16)), 1),
        # full
        *(it(f"{spec} bias over 2048 tokens, {dt}", b.replace(batch=1, seqlen_q=2048, seqlen_k=2048, dtype=dt,
                                                             attn_bias=spec, causal="bottom_right"), 2, pin=("dtype",))
          for spec in ("add.1hqk", "keep.b11k") for dt in ("fp16", "bf16")),
    ]


def cases(tier: str) -> list[Case]:
    return grid.nominal(intents(), tier)


def _dead_keys(case: Case) -> torch.Tensor | None:
    """(batch, seqlen_k) bool: keys no query of the batch item may attend to (the bool mask together
    with the causal mask and window), where some exist."""
    keep = reference.keep_mask(case)
    if keep is None:
        return None
    ok = reference.allowed(case)
    full = keep.expand(case.batch, case.nheads, case.seqlen_q, case.seqlen_k)
    if ok is not None:
        full = full & ok
    dead = ~full.any(dim=(1, 2))
    return dead if bool(dead.any()) and not bool(dead.all()) else None


def masked_keys_do_not_matter(backend: Backend, case: Case, device: str, verdict: Verdict) -> None:
    """Needing no tolerance: keys and values that the mask hides from every query of a batch item are
    replaced by other numbers; no output may change by a single bit (but rows that see no key at all
    where the declared value is the mean of V, which reads every key)."""
    dead = _dead_keys(case)
    if dead is None:
        return
    inputs = make_inputs(case, device)
    out = judge_memory.copied(_call(backend, inputs.q, inputs.k, inputs.v, case, attn_bias(case, device)))
    gen = torch.Generator().manual_seed(case.seed + 11)
    with torch.no_grad():  # in place, so the layout is kept
        where = dead.to(inputs.k.device)
        for t in (inputs.k, inputs.v):
            t[where] = (torch.randn(t[where].shape, generator=gen) * 8).to(t.device, t.dtype)
    again = _call(backend, inputs.q, inputs.k, inputs.v, case, attn_bias(case, device))
    same = bitwise_equal(out, again)
    empty = reference.fully_masked_rows(case, out.device)
    if empty is not None and backend.capabilities.masked_rows == "mean_v":
        same = same | reference._rows_bqh1(empty)
    if not bool(same.all()):
        rows = (~same).flatten(2).any(-1)
        verdict.fail("masked-keys-independence",
                     f"keys/values at {int(dead.sum())} (batch item, key) positions are masked for every query of "
                     f"their batch item; changing them changed {int(rows.sum())} output rows, first "
                     f"(batch item, row) {tuple(int(x) for x in rows.nonzero()[0])}")


def _call(backend: Backend, q, k, v, case: Case, bias: torch.Tensor):
    kwargs = kwargs_for(backend, case, q.device)
    kwargs["attn_bias"] = bias
    return checked_output(backend, invoke(backend, backend.fn, q, k, v, **kwargs), q)


def _dbias_reference(case: Case, inputs, masked_rows: str, accumulation: str):
    """float64 autograd's dbias, the largest error of the same-precision computations (their autograd
    and FlashAttention's backward formulas, in every evaluation order), and the magnitude of the terms
    that sum to one element of dbias (|P∘(|dP|+|D|)| summed over the broadcast dimensions)."""
    bias = attn_bias(case, inputs.q.device)

    def grads(upcast, **kwargs):
        dtype = torch.float64 if upcast else case.torch_dtype
        leaf = bias.detach().to(dtype).requires_grad_(True)
        with torch.enable_grad():
            out = reference.attention(*(t.detach().to(dtype) for t in (inputs.q, inputs.k, inputs.v)), case,
                                      upcast=upcast, bias=leaf, masked_rows=masked_rows, **kwargs)
            return torch.autograd.grad(out, leaf, inputs.dout.to(dtype))[0]

    ref = grads(True)
    error = 0.0
    for precision in gradient_precisions(case.torch_dtype, accumulation):
        for order in reference.ORDERS if precision != "fp32_p" else ("scale_q", "exp2"):
            error = max(error, max_abs_error(grads(False, order=order, precision=precision), ref))
            flash = reference.flash_backward(inputs.q, inputs.k, inputs.v, inputs.dout, case, masked_rows=masked_rows,
                                             order=order, precision=precision, with_dbias=True)[3]
            error = max(error, max_abs_error(flash, ref))
    q, k, v, dout = (t.detach().to(torch.float64) for t in (inputs.q, inputs.k, inputs.v, inputs.dout))
    kx, vx = reference._expand(k, v, case)
    scores, _ = reference._masked_scores(q, kx, case, "scale_q")
    probs = reference._zero_masked_rows(torch.softmax(scores, dim=-1), case)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, vx)
    delta = (dout * out).sum(-1).transpose(1, 2).unsqueeze(-1).abs()
    terms = probs * (torch.einsum("bqhd,bkhd->bhqk", dout, vx).abs() + delta)
    broadcast = [i for i, n in enumerate(case.bias_shape) if n == 1]
    magnitude = float((terms.sum(dim=broadcast) if broadcast else terms).max())
    return ref, error, magnitude


def compare_bias_gradient(backend: Backend, case: Case, device: str, verdict: Verdict) -> None:
    inputs = make_inputs(case, device, requires_grad=True)
    bias = attn_bias(case, device).requires_grad_(True)
    out = _call(backend, inputs.q, inputs.k, inputs.v, case, bias)
    if not out.requires_grad:
        verdict.fail("dbias", "output is not differentiable although bias_grad is declared")
        return
    got = torch.autograd.grad(out, bias, inputs.dout, allow_unused=True)[0]
    if not torch.equal(bias.detach(), attn_bias(case, device)):
        verdict.fail("inputs-unmodified", "the backward modified its attn_bias (requiring grad) in place")
    if got is None:
        verdict.fail("dbias", "no gradient reached the float attn_bias although bias_grad is declared")
        return
    if tuple(got.shape) != tuple(bias.shape):
        verdict.fail("dbias", f"the bias gradient has shape {tuple(got.shape)}, the bias {tuple(bias.shape)}")
        return
    ref, error, magnitude = _dbias_reference(case, inputs, backend.capabilities.masked_rows,
                                             backend.capabilities.accumulation)
    verdict.add("dbias", compare("dbias", got, ref, error, magnitude, case.torch_dtype, GRADIENT_MULTIPLE,
                                 max(case.seqlen_q, case.seqlen_k)))


def bias_layouts(backend: Backend, case: Case, device: str, verdict: Verdict) -> None:
    """attn-bias-layout: the same bias passed as a tensor whose memory is not laid out as its shape says
    must give the same attention. Expanded (``.expand()`` to (batch, nheads, seqlen_q, seqlen_k): stride 0
    where it broadcasts, as a key-padding mask usually arrives) and strided (a view of a buffer whose
    rows are 16-element aligned and longer than seqlen_k, the layout xFormers asks for). A kernel reading
    the bias as if contiguous reads other rows (or past the end of an expanded one's memory). Only for
    backends that declare non-contiguous inputs."""
    if not backend.capabilities.noncontiguous:
        return
    bias = attn_bias(case, device)
    full = (case.batch, case.nheads, case.seqlen_q, case.seqlen_k)
    layouts = [] if tuple(bias.shape) == full else [("expanded", bias.expand(full))]
    width = -(-case.seqlen_k // 16) * 16 + 16
    buffer = torch.zeros((*bias.shape[:-1], width), dtype=bias.dtype, device=bias.device)
    buffer[..., : case.seqlen_k] = bias
    layouts.append((f"strided (rows {width} apart)", buffer[..., : case.seqlen_k]))
    inputs = make_inputs(case, device)
    for what, view in layouts:
        out = _call(backend, inputs.q, inputs.k, inputs.v, case, view)
        comparison = output_comparison(backend, case, device, out=out, diagnose=False)
        verdict.add("attn-bias-layout", dataclasses.replace(comparison, name=f"out, bias {what}"))


def bias_unmodified(backend: Backend, case: Case, device: str, verdict: Verdict) -> None:
    """inputs-unmodified: the attn_bias after a call without grad, and after a forward and backward (a
    backward may not write dbias, or anything, into the caller's bias)."""
    pristine = attn_bias(case, device)
    backward = backend.capabilities.backward
    for grad in (False, True) if backward else (False,):
        inputs = make_inputs(case, device, requires_grad=grad)
        given = pristine.clone()
        out = _call(backend, inputs.q, inputs.k, inputs.v, case, given)
        if grad and out.requires_grad:
            torch.autograd.grad(out, (inputs.q, inputs.k, inputs.v), inputs.dout)
        if not torch.equal(given, pristine):
            verdict.fail("inputs-unmodified", f"the {'forward and backward' if grad else 'call'} modified its attn_bias "
                                              "in place")
            return


def run(backend: Backend, case: Case, device: str) -> Verdict:
    verdict = Verdict(NAME, backend.name, case, device)
    against_reference(backend, case, device, verdict, "attn-bias-reference")
    masked_keys_do_not_matter(backend, case, device, verdict)
    if backend.capabilities.bias_grad and backend.capabilities.backward and case.bias_kind in ("add", "big"):
        compare_bias_gradient(backend, case, device, verdict)
    bias_layouts(backend, case, device, verdict)
    bias_unmodified(backend, case, device, verdict)
    return verdict


CHECK = Check(NAME, cases, run, needs=NEEDS, feature=CASE_FEATURE, intents=intents, reference="gradients")
