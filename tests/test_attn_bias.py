"""The attn_bias case feature and check: the tensor a case names, the reference with it (against an
independent formula, SDPA's math kernel in float64), fully masked rows per batch item and head, and the
bias and its gradient crossing to the kernel's process and back."""

import pytest
import torch
import torch.nn.functional as F

from conformance import reference, results
from conformance.case import Case
from conformance.inputs import attn_bias, make_inputs

SPECS = ("keep.b11k", "rows.b11k", "keep.11qk", "rows.bhqk", "rows.1hq1", "add.1hqk", "add.bhqk", "big.b1qk",
         "big.bhq1")


@pytest.mark.parametrize("spec", SPECS)
def test_the_case_names_its_tensor(spec):
    case = Case(batch=3, seqlen_q=9, seqlen_k=13, nheads=4, nheads_k=2, dtype="bf16", attn_bias=spec, seed=5)
    assert Case.from_id(case.id) == case and f"_bias{spec}_" in case.id
    bias = attn_bias(case, "cpu")
    want = tuple(n if c != "1" else 1 for n, c in zip((3, 4, 9, 13), spec.split(".")[1]))
    assert tuple(bias.shape) == want == case.bias_shape
    assert bias.dtype == (torch.bool if spec[:4] in ("keep", "rows") else torch.bfloat16)
    assert torch.equal(bias, attn_bias(case, "cpu"))  # drawn from the seed
    assert not torch.equal(bias, attn_bias(case.replace(seed=6), "cpu")) or spec == "keep.1hq1"
    if spec.startswith("keep"):  # every query keeps a key
        assert bias.expand(3, 4, 9, 13).any(-1).all()
    if spec.startswith("rows"):
        assert reference.fully_masked_rows(case) is not None
    if spec.startswith("big"):  # offsets far beyond exp's float32 range, either sign
        assert bias.float().abs().min() > 88


@pytest.mark.parametrize("bad", ["keep", "keep.bh1", "mask.b11k", "add.hb1k", "add.B11K"])
def test_a_malformed_spec_is_refused(bad):
    with pytest.raises(ValueError, match="attn_bias"):
        Case(attn_bias=bad)


def test_attn_bias_combines_with_neither_varlen_nor_cache():
    with pytest.raises(ValueError, match="does not combine"):
        Case(batch=1, seqlen_q=1, seqlen_k=8, cache_seqlens=(3,), attn_bias="add.b11k")


@pytest.mark.parametrize("spec, causal", [(s, c) for s in SPECS for c in (None, "bottom_right", "top_left")])
def test_reference_equals_sdpa_math_in_float64(spec, causal):
    """The reference's bias term, written independently: SDPA's attn_mask on float64 inputs (its math
    kernel returns zeros for rows it leaves no key)."""
    case = Case(batch=3, seqlen_q=9, seqlen_k=13, nheads=4, dtype="fp64", attn_bias=spec, causal=causal, seed=3)
    x = make_inputs(case, "cpu")
    mask = attn_bias(case, "cpu")
    if causal:
        keep = torch.ones(9, 13, dtype=torch.bool).tril(4 if causal == "bottom_right" else 0)
        mask = mask & keep if mask.dtype == torch.bool else mask.masked_fill(~keep, float("-inf"))
    want = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (x.q, x.k, x.v)), attn_mask=mask).transpose(1, 2)
    got = reference.attention(x.q, x.k, x.v, case)
    assert torch.allclose(got, want, atol=1e-12, rtol=0)


def test_fully_masked_rows_per_batch_item_and_head():
    case = Case(batch=3, seqlen_q=5, seqlen_k=7, nheads=2, attn_bias="rows.b11k", seed=0)
    rows = reference.fully_masked_rows(case)
    keep = attn_bias(case, "cpu")
    assert rows.shape == (3, 1, 5) and torch.equal(rows, ~keep.any(-1).expand(3, 1, 5))
    x = make_inputs(case, "cpu")
    out = reference.attention(x.q, x.k, x.v, case, masked_rows="mean_v")
    dead = int(rows[:, 0, 0].nonzero()[0])
    assert torch.allclose(out[dead], x.v[dead].double().mean(0, keepdim=True).expand(5, 2, 64))
    # the causal mask and the mask together: rows the intersection leaves empty
    both = Case(batch=1, seqlen_q=4, seqlen_k=4, nheads=1, attn_bias="keep.11qk", causal="top_left", seed=0)
    keep = attn_bias(both, "cpu")[0, 0] & torch.ones(4, 4, dtype=torch.bool).tril()
    got = reference.fully_masked_rows(both)
    assert torch.equal(got[0, 0] if got is not None else torch.zeros(4, dtype=torch.bool), ~keep.any(-1))


def test_flash_backward_dbias_equals_autograd():
    case = Case(batch=2, seqlen_q=9, seqlen_k=13, nheads=4, nheads_k=2, dtype="fp64", attn_bias="add.b1qk",
                causal="bottom_right", softcap=3.0, seed=2)
    x = make_inputs(case, "cpu")
    leaf = attn_bias(case, "cpu").requires_grad_(True)
    out = reference.attention(x.q, x.k, x.v, case, bias=leaf)
    want = torch.autograd.grad(out, leaf, x.dout)[0]
    got = reference.flash_backward(x.q, x.k, x.v, x.dout, case, with_dbias=True)[3]
    assert got.shape == leaf.shape and torch.allclose(got, want, atol=1e-12)


def test_the_check_through_the_kernel_process(pytester):
    """The bias crosses to the kernel's process and its gradient comes back: naive and sdpa-math pass a
    float-bias case (with dbias) and a fully-masked-rows case, each declared masked-row value."""
    ids = "b2_q17_k33_h4_kv2_d32_fp32_causalbr_biasadd.b1qk_seed1,b3_q17_k33_h4_d32_fp16_biasrows.b11k_seed2"
    result = pytester.runpytest_subprocess("--pyargs", "conformance.suite", "-p", "no:cacheprovider", "--fuzz=off",
                                           "--backend=naive,sdpa-math", "--check=attn_bias", f"--case={ids}")
    journal = results.read(pytester.path / "conformance-results.jsonl")
    assert result.ret == 0, result.stdout.str()[-3000:]
    assert [r["outcome"] for r in journal.cases] == ["passed"] * 4
    dbias = [c for r in journal.cases for c in r["comparisons"] if c["name"] == "dbias"]
    assert len(dbias) == 2  # the float-bias case, for each backend


FLEX_CASES = ["b2_q17_k33_h4_kv2_d16_fp32_causalbr_biasadd.b1qk_seed1", "b3_q17_k33_h4_d16_fp32_biasrows.b11k_seed2",
              "b2_q33_k17_h4_d16_fp32_causaltl_biaskeep.11qk_seed3", "b2_q17_k33_h4_d16_fp32_biasbig.bhq1_seed4",
              "b2_q17_k33_h4_d16_fp32_win3.2_cap5_alibi_biasadd.bhqk_seed5"]


@pytest.mark.parametrize("case_id", FLEX_CASES)
def test_flex_adapter_with_attn_bias(case_id):
    """Eager flex_attention (no backward on the CPU) stands in for the compiled one: the bool mask in the
    block mask, the float bias in the score_mod, beside causal, window, softcap and ALiBi."""
    import dataclasses

    from torch.nn.attention.flex_attention import flex_attention

    from conformance.backends import flex
    from conformance.checks import execute

    caps = dataclasses.replace(flex.BACKEND.capabilities, backward=False, devices=frozenset({"cpu"}))
    eager = dataclasses.replace(flex.BACKEND, capabilities=caps,
                                fn=lambda *a, **k: flex.attention(*a, flex=flex_attention, **k))
    verdict = execute("attn_bias", eager, Case.from_id(case_id), "cpu")
    assert verdict.passed, verdict.message()


@pytest.mark.parametrize("spec, causal", [("rows.b11k", "bottom_right"), ("add.1hqk", "top_left"),
                                          ("keep.11qk", None)])
def test_xformers_tensor_bias(spec, causal):
    """The tensor xFormers gets (additive, causal folded in, 5-d for GQA, rows 16-element aligned) gives
    the reference's attention."""
    from conformance.backends import xformers

    case = Case(batch=2, seqlen_q=9, seqlen_k=13, nheads=4, nheads_k=2, head_dim=16, dtype="fp64", attn_bias=spec,
                causal=causal)
    x = make_inputs(case, "cpu")
    bias = xformers._tensor_bias(attn_bias(case, "cpu"), x.q, x.k, causal is not None, causal or "bottom_right")
    assert bias.shape == (2, 2, 2, 9, 13) and bias.stride(-2) % 16 == 0
    kx, vx = (t.repeat_interleave(2, 2) for t in (x.k, x.v))
    scores = torch.einsum("bqhd,bkhd->bhqk", x.q, kx) * case.scale + bias.flatten(1, 2)
    out = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, -1).nan_to_num(0.0), vx)
    assert torch.allclose(out, reference.attention(x.q, x.k, x.v, case), atol=1e-12)
