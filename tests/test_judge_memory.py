"""What the judge keeps to judge with (cached references, its copies of replies) lies in CUDA memory of its
own pool: a kernel's process maps the whole cudaMalloc segment of each tensor shared with it."""

import collections
import dataclasses

import pytest
import torch

from conformance import expected, judge_memory, kernel_client
from conformance.case import Case
from conformance.inputs import make_inputs


@dataclasses.dataclass(frozen=True)
class _Kept:
    rows: torch.Tensor
    name: str


@dataclasses.dataclass
class _Derived:
    rows: torch.Tensor
    count: int = dataclasses.field(init=False, default=0)


def test_kept_follows_structures_and_leaves_cpu_tensors_as_they_are_copied_copies_them():
    t = torch.ones(3)
    Pair = collections.namedtuple("Pair", "a b")
    derived = _Derived(t)
    derived.count = 5
    value = (t, [t, {"a": t}], _Kept(t, "x"), Pair(t, 2), derived, 5, None)
    got = judge_memory.kept(value)
    assert got[0] is t and got[1][0] is t and got[1][1]["a"] is t and got[2].rows is t and got[2].name == "x"
    assert got[3] == (t, 2) and type(got[3]) is Pair and got[4].rows is t and got[4].count == 5 and got[5:] == (5, None)
    again = judge_memory.copied(value)
    assert again[0] is not t and torch.equal(again[0], t) and again[2].rows is not t and again[3].a is not t
    assert again[4].count == 5 and again[4] is not derived


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA memory pools: a GPU's")
def test_what_the_judge_keeps_lies_in_no_segment_it_shares_with_a_kernel():
    shared = torch.ones(1000, device="cuda")  # an input, as the kernel's process would map it
    segment = kernel_client.allocation_of(shared.data_ptr(), shared.device)[0]
    plain = torch.zeros(1000, device="cuda", dtype=torch.float64)
    assert kernel_client.allocation_of(plain.data_ptr(), plain.device)[0] == segment  # the exposure
    kept = judge_memory.kept((plain, _Kept(plain, "rows")))
    again = judge_memory.copied(plain)
    assert torch.equal(kept[0], plain) and torch.equal(kept[1].rows, plain) and torch.equal(again, plain)
    for t in (kept[0], kept[1].rows, again):
        assert kernel_client.allocation_of(t.data_ptr(), t.device)[0] != segment
    with judge_memory.private(plain.device), judge_memory.private(plain.device):  # nested: the outer routing
        inner = judge_memory.copied(plain)
    assert kernel_client.allocation_of(inner.data_ptr(), inner.device)[0] != segment
    judge_memory.release()  # the pool dropped: what it held stays valid, a new pool serves the next copy
    assert torch.equal(kept[0], plain) and torch.equal(judge_memory.copied(plain), plain)
    case = Case(batch=1, seqlen_q=64, seqlen_k=64, nheads=2, head_dim=32, dtype="fp16", seed=3)
    reference = expected.expected(case, "cuda", "zeros", True)  # cached for the next backends
    inputs = make_inputs(case, "cuda")  # what the next backend's kernel gets
    shared_segments = {kernel_client.allocation_of(t.data_ptr(), t.device)[0] for t in (inputs.q, inputs.k, inputs.v)}
    for t in (reference.out, *reference.grads):
        assert kernel_client.allocation_of(t.data_ptr(), t.device)[0] not in shared_segments
