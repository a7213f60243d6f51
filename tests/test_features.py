"""The case-feature table (features.py) and the declarations it keys: a Case field and a Capabilities
flag per feature, the id token read back, the keyword arguments passed, the skip reason given."""

import dataclasses

import pytest
import torch

from conformance import features
from conformance.backend import Backend, kwargs_for
from conformance.backends import naive
from conformance.capabilities import Capabilities
from conformance.case import Case

WITH = {  # a case using each feature
    "window": Case(window=(3, 0)),
    "softcap": Case(softcap=5.0),
    "alibi": Case(alibi=True),
    "varlen": Case(batch=3, seqlen_q=9, seqlen_k=9, varlen=(9, 1, 4)),
    "kvcache": Case(batch=2, seqlen_q=2, seqlen_k=40, cache_seqlens=(0, 37)),
    "attn_bias": Case(attn_bias="add.1hqk"),
    "paged_kv": Case(batch=2, seqlen_q=2, seqlen_k=48, cache_seqlens=(0, 37), page_block=16),  # with kvcache
    "mixed_batch": Case(batch=3, seqlen_q=5, seqlen_k=48, cache_seqlens=(0, 37, 20), new_seqlens=(5, 1, 2)),
}


def test_every_feature_has_its_declarations_and_a_case_here():
    case_defaults = {f.name: f.default for f in dataclasses.fields(Case)}
    caps_defaults = {f.name: f.default for f in dataclasses.fields(Capabilities)}
    assert set(WITH) == set(features.BY_NAME)
    for f in features.FEATURES:
        assert case_defaults[f.field] == f.absent and not f.present(Case())
        assert caps_defaults[f.name] is False, f"Capabilities.{f.name} must be a flag, off by default"


@pytest.mark.parametrize("name", sorted(WITH))
def test_a_feature_round_trips_is_refused_and_is_passed(name):
    case, feature = WITH[name], features.BY_NAME[name]
    used = [f.name for f in features.present(case)]
    assert used == [name] or (name in ("paged_kv", "mixed_batch") and used == ["kvcache", name])  # a cache too
    assert feature.id_token(case) in case.id.split("_") and Case.from_id(case.id) == case
    assert f"{name} not supported" in Capabilities().not_supported_reasons(case, "cpu")
    assert not Capabilities(**{f: True for f in used}).not_supported_reasons(case, "cpu")
    kwargs = kwargs_for(Backend("b", naive.attention, Capabilities()), case, torch.device("cpu"))
    assert set(kwargs) == {"causal", *feature.kwargs(case, "cpu")}


def test_feature_values_are_validated_and_own_calls_do_not_combine():
    with pytest.raises(ValueError, match="softcap must be >= 0"):
        Case(softcap=-1.0)
    with pytest.raises(ValueError, match="varlen and kvcache do not combine"):
        Case(batch=1, seqlen_q=4, seqlen_k=4, varlen=(4,), cache_seqlens=(0,))
    with pytest.raises(ValueError, match="cannot read token 'winx.1'"):
        Case.from_id("b1_q4_k4_h1_d8_fp32_winx.1_seed0")
