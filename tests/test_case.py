"""Cases: ids round-trip, invalid cases are refused with reasons, inputs follow the layout."""

import pytest
import torch

from conformance.case import Case
from conformance.checks import CHECKS
from conformance.inputs import make_inputs


def test_every_grid_case_round_trips_through_its_id():
    for module in CHECKS.values():
        for case in module.cases("full"):
            assert Case.from_id(case.id) == case


def test_id_round_trips_every_field():
    case = Case(batch=3, seqlen_q=7, seqlen_k=9, nheads=6, nheads_k=2, head_dim=40, dtype="bf16", causal="top_left",
                softmax_scale=0.25, layout="bhsd", magnitude=16, window=(-1, 3), softcap=30.0, alibi=True, seed=5)
    assert Case.from_id(case.id) == case


@pytest.mark.parametrize("fields, message", [
    ({"nheads": 6, "nheads_k": 4}, "not a multiple"),
    ({"dtype": "fp8"}, "dtype 'fp8'"),
    ({"layout": "packed", "seqlen_q": 3, "seqlen_k": 4}, "packed"),
    ({"seqlen_q": 0}, ">= 1"),
])
def test_invalid_case_is_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        Case(**fields)


def test_seeds_are_stable_and_distinct():
    a, b = Case().seeded(), Case(seqlen_q=17).seeded()
    assert a.seed == Case().seeded().seed and a.seed != b.seed


@pytest.mark.parametrize("layout", ["contiguous", "packed", "bhsd"])
def test_inputs_have_layout_shapes_and_distinct_batch_items(layout):
    case = Case(batch=2, seqlen_q=5, seqlen_k=5, nheads=4, nheads_k=2, head_dim=8, layout=layout)
    inputs = make_inputs(case, "cpu")
    assert inputs.q.shape == (2, 5, 4, 8) and inputs.k.shape == inputs.v.shape == (2, 5, 2, 8)
    assert inputs.q.is_contiguous() == (layout == "contiguous")
    assert not torch.equal(inputs.q[0], inputs.q[1])
    again = make_inputs(case, "cpu")
    assert torch.equal(inputs.q, again.q) and torch.equal(inputs.v, again.v)
