"""Cases as intents realised in each backend's declared space: rounding that keeps the intent, reasons
for what cannot be realised, every pair of declared values covered, a narrowly declared kernel tested
in its own space, and the long half-precision cases that catch a half-precision accumulator."""

import sys
import textwrap

import pytest

from conformance import grid
from conformance.backends import naive, sdpa_math, tiled
from conformance.case import Case
from conformance.checks import CHECKS, execute
from mutants import PRECISION_MUTANTS

# The limits of a real third-party Triton FlashAttention kernel (issue 18).
NARROW = {"dtypes": ["fp16", "bf16"], "head_dims": [64, 128], "seqlen_multiple": 128, "equal_seqlens": True,
          "causal": [], "gqa": False, "mqa": False}


def test_lengths_round_to_the_multiple_keeping_the_intent():
    assert grid.round_length(129, 1) == 129
    assert grid.round_length(129, 128) == 384  # just past a block: one multiple past a boundary
    assert grid.round_length(257, 128) == 384 and grid.round_length(65, 64) == 192
    assert grid.round_length(1000, 128) == 1024 and grid.round_length(17, 128) == 128
    assert grid.round_length(4096, 128) == 4096


def test_realisation_adapts_values_and_names_what_it_cannot_keep():
    caps = tiled.BACKEND.capabilities.updated(NARROW)
    base = Case(batch=2, seqlen_q=65, seqlen_k=65, nheads=4, head_dim=40, dtype="fp32")
    case = grid.realise(grid.intent("x", base), caps, "cpu")
    assert case.dtype in ("fp16", "bf16") and case.head_dim == 64 and case.seqlen_q == case.seqlen_k == 384
    assert Case.from_id(case.id) == case  # --case reruns exactly the realised case
    unequal = grid.realise(grid.intent("q<k", base.replace(seqlen_k=129)), caps, "cpu")
    assert any("seqlen_q != seqlen_k is the intent" in r for r in unequal)
    assert any("head dim 40 is the intent" in r for r in grid.realise(grid.intent("d", base, pin=("head_dim",)),
                                                                        caps, "cpu"))
    assert any("GQA" in r for r in grid.realise(grid.intent("gqa", base.replace(nheads_k=2)), caps, "cpu"))
    # unequal seqlens stay unequal after rounding; CUDA realises unpinned fp32 intents in 16 bits
    wide = tiled.BACKEND.capabilities.updated({"seqlen_multiple": 128, "devices": ["cpu", "cuda"]})
    both = grid.realise(grid.intent("q<k", base.replace(seqlen_k=129)), wide, "cuda")
    assert both.seqlen_q == 384 and both.seqlen_k == 640 and both.dtype in ("fp16", "bf16")
    assert grid.realise(grid.intent("fp32", base, pin=("dtype",)), wide, "cuda").dtype == "fp32"


def test_the_same_declaration_gets_the_same_cases():
    ids = [[r.case.id for r in grid.for_backend(CHECKS["forward"], b.BACKEND.capabilities, "cpu", "standard") if r.case]
           for b in (sdpa_math, tiled)]
    assert ids[0] == ids[1]


@pytest.mark.parametrize("narrow", [False, True], ids=["full", "narrow"])
@pytest.mark.parametrize("check", ["forward", "gradients", "causal", "window"])
def test_every_pair_of_declared_values_meets(check, narrow):
    caps = tiled.BACKEND.capabilities.updated(NARROW if narrow else {})
    module = CHECKS[check]
    feature = module.feature if module.feature != "causal" else None
    factors = grid.factors(caps, "cpu", 1, feature, causal_only=check == "causal")
    rows = grid.covering_array(factors, grid._allowed)
    if not caps.causal and check == "causal":
        return
    names = [n for n in factors if factors[n]]
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            for va in factors[a]:
                for vb in factors[b]:
                    if grid._allowed({a: va, b: vb}):
                        assert any(r[a] == va and r[b] == vb for r in rows), (a, va, b, vb)
    realised = [r for r in grid.for_backend(module, caps, "cpu", "standard") if r.intent.purpose.startswith("pairwise")]
    assert realised and all(r.case is not None for r in realised)  # built in the declared space: all realisable
    if check in ("forward", "gradients") and not narrow:
        assert any(r.case.seqlen_k > 2048 for r in realised)  # keys beyond 2048 at the standard tier


NARROW_KERNEL = '''
import torch
from conformance.backends import tiled

def attention(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
    """fp16/bf16 only, head dims 64 and 128, seqlen a multiple of 128, seqlen_q == seqlen_k, no causal,
    no GQA: it refuses anything else, as such kernels assert."""
    assert q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] in (64, 128) and not causal
    assert q.shape[1] == k.shape[1] and q.shape[1] %% 128 == 0 and q.shape[2] == k.shape[2]
    return tiled.attention(q, k, v, softmax_scale=softmax_scale)

attention.conformance_capabilities = %r
''' % NARROW


def test_a_narrowly_declared_kernel_is_tested_in_its_own_space(pytester):
    pytester.makepyfile(narrow=NARROW_KERNEL)
    result = pytester.runpytest("--pyargs", "conformance.suite", "-p", "no:cacheprovider", "--tier=quick",
                                "--backend=narrow.py:attention", "--check=forward,gradients", "--fuzz=off",
                                "--isolation=none")
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) == 0 and outcomes["passed"] >= 20, outcomes
    ran = {check: sum(1 for line in result.outlines if line.startswith("  narrow") and f"{check} " in line)
           for check in ("forward", "gradients")}
    assert all(ran.values())
    result.stdout.fnmatch_lines(["*coverage (cases run / intents not realisable / other skips):*",
                                 "*forward *[1-9]*/*/0, gradients *[1-9]*/*/0*"])
    result.stdout.no_fnmatch_line("*!!! *only*correctness cases ran*")


def test_a_backend_with_few_realised_cases_is_named_loudly(pytester):
    pytester.makepyfile(narrow=NARROW_KERNEL.replace('"seqlen_multiple": 128', '"seqlen_multiple": 4096'))
    result = pytester.runpytest("--pyargs", "conformance.suite", "-p", "no:cacheprovider", "--tier=quick",
                                "--backend=narrow.py:attention", "--check=sanity", "--fuzz=off", "--isolation=none")
    result.stdout.fnmatch_lines(["*!!! narrow.py:attention: only * correctness cases ran (minimum 20)*"])
    rerun = pytester.runpytest("--pyargs", "conformance.suite", "-p", "no:cacheprovider", "--backend=naive",
                               "--check=forward", "--case=b1_q16_k16_h2_d16_fp32_seed1", "--isolation=none")
    rerun.assert_outcomes(passed=1)
    rerun.stdout.no_fnmatch_line("*!!! *only*correctness cases ran*")  # the user chose the cases


def long_half(tier):
    return [r.case for r in grid.for_backend(CHECKS["forward"], tiled.BACKEND.capabilities, "cpu", tier)
            if r.case is not None and r.case.dtype in ("fp16", "bf16") and r.case.seqlen_k >= 2048
            and r.case.seqlen_q > 1]


def test_long_half_precision_cases_catch_a_half_precision_accumulator():
    quick, standard = long_half("quick"), long_half("standard")
    assert {c.dtype for c in quick} == {"fp16", "bf16"}
    assert {(c.dtype, c.causal) for c in standard if c.seqlen_k >= 4096} == {
        (dt, causal) for dt in ("fp16", "bf16") for causal in (None, "bottom_right")}
    mutant = PRECISION_MUTANTS[0]
    for case in standard:
        if case.seqlen_k >= 4096:  # causal too: each class of rows is held to its own errors
            assert mutant.prop in execute(mutant.check, mutant.backend, case, "cpu").failed_properties, case.id
    for backend in (tiled.BACKEND, sdpa_math.BACKEND, naive.BACKEND):
        for case in quick:
            verdict = execute("forward", backend, case, "cpu")
            assert verdict.passed, verdict.message()
    short = Case(batch=2, seqlen_q=129, seqlen_k=129, nheads=4, head_dim=64, dtype="bf16")
    assert execute("forward", mutant.backend, short, "cpu").passed  # subtle: right on short sums
