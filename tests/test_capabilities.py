"""Declarations are data; every case outside them gets a readable reason."""

import pytest

from conformance.backend import Backend, ContractError, call, kwargs_for
from conformance.capabilities import Capabilities
from conformance.case import Case
from conformance.inputs import make_inputs


def test_defaults_describe_flash_attn_func():
    caps = Capabilities()
    assert caps.causal == ("bottom_right",) and caps.masked_rows == "zeros" and caps.gqa and caps.backward
    assert caps.not_supported_reasons(Case(head_dim=256), "cpu") == []
    assert caps.memory == "unknown"


@pytest.mark.parametrize("declared, case, reason", [
    ({"devices": ["cuda"]}, Case(), "device cpu not supported (declared: cuda)"),
    ({"dtypes": ["fp16", "bf16"]}, Case(dtype="fp32"), "dtype fp32 not supported (declared: bf16, fp16)"),
    ({"head_dims": [64, 128]}, Case(head_dim=96), "head dim 96 not supported (declared: {64, 128})"),
    ({"head_dim_multiple": 8}, Case(head_dim=59), "head dim 59 not supported (declared: 1-256 (multiples of 8))"),
    ({"causal": []}, Case(causal="bottom_right"), "causal masking not supported"),
    ({}, Case(causal="top_left", seqlen_q=3, seqlen_k=5), "causal alignment top_left not supported (declared: bottom_right)"),
    ({"gqa": False}, Case(nheads=4, nheads_k=2), "GQA (nheads 4, nheads_k 2) not supported"),
    ({"mqa": False}, Case(nheads=4, nheads_k=1), "MQA (nheads 4, nheads_k 1) not supported"),
    ({"softmax_scale": False}, Case(softmax_scale=0.5), "custom softmax_scale not supported"),
    ({"noncontiguous": False}, Case(layout="bhsd"), "non-contiguous inputs (bhsd) not supported"),
    ({"seqlen_multiple": 64}, Case(seqlen_q=65, seqlen_k=65), "seqlen 65 is not a multiple of 64"),
    ({"max_seqlen": 100}, Case(seqlen_k=128), "seqlen 128 above the maximum 100"),
    ({"equal_seqlens": True}, Case(seqlen_q=3), "only seqlen_q == seqlen_k is supported"),
    ({}, Case(window=(4, 4)), "window not supported"),
    ({}, Case(softcap=5.0), "softcap not supported"),
    ({}, Case(alibi=True), "alibi not supported"),
])
def test_reasons(declared, case, reason):
    assert reason in Capabilities().updated(declared).not_supported_reasons(case, "cpu")


def test_alignment_does_not_matter_for_square_cases():
    assert Capabilities().not_supported_reasons(Case(causal="top_left"), "cpu") == []


def test_needs_and_nan_rows():
    caps = Capabilities(backward=False)
    assert caps.not_supported_reasons(Case(), "cpu", ("backward",)) == ["backward not supported"]
    nan = Capabilities(masked_rows="nan")
    masked = Case(seqlen_q=9, seqlen_k=4, causal="bottom_right")
    assert "fully masked rows return NaN" in nan.not_supported_reasons(masked, "cpu", ("backward",))[0]


@pytest.mark.parametrize("declared", [{"dtypes": ["fp8"]}, {"memory": "cubic"}, {"causal": ["diagonal"]},
                                      {"masked_rows": "ones"}, {"head_dim_min": 300}])
def test_invalid_declarations_are_refused(declared):
    with pytest.raises(ValueError):
        Capabilities().updated(declared)


def test_kwargs_follow_flash_attn_convention():
    one = Backend("one", lambda *a, **k: None, Capabilities())
    both = Backend("both", lambda *a, **k: None, Capabilities(causal=("bottom_right", "top_left")))
    assert kwargs_for(one, Case(), "cpu") == {"causal": False}
    case = Case(causal="top_left", softmax_scale=0.5, window=(3, -1), softcap=2.0, alibi=True)
    kwargs = kwargs_for(both, case, "cpu")
    assert kwargs["causal"] is True and kwargs["causal_alignment"] == "top_left" and kwargs["softmax_scale"] == 0.5
    assert kwargs["window_size"] == (3, -1) and kwargs["softcap"] == 2.0 and kwargs["alibi_slopes"].shape == (4,)
    assert "causal_alignment" not in kwargs_for(one, case, "cpu")


@pytest.mark.parametrize("ret, message", [
    (lambda q: "out", "returned str, not a tensor"),
    (lambda q: q[:, :1], "shape"),
    (lambda q: q.double(), "dtype torch.float64 instead of q's torch.float32"),
    (lambda q: (q.clone(), None), None),
])
def test_output_contract(ret, message):
    backend = Backend("b", lambda q, k, v, **kw: ret(q), Capabilities())
    inputs = make_inputs(Case(), "cpu")
    if message is None:
        assert call(backend, inputs.q, inputs.k, inputs.v, Case()).shape == inputs.q.shape
    else:
        with pytest.raises(ContractError, match=message):
            call(backend, inputs.q, inputs.k, inputs.v, Case())
