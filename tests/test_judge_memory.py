"""What the judge keeps to judge with (cached references, its copies of replies) lies in CUDA memory of its
own pool: a kernel's process maps the whole cudaMalloc segment of each tensor shared with it."""

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


def test_kept_follows_structures_and_leaves_cpu_tensors_as_they_are():
    t = torch.ones(3)
    value = (t, [t, {"a": t}], _Kept(t, "x"), 5, None)
    got = judge_memory.kept(value)
    assert got[0] is t and got[1][0] is t and got[1][1]["a"] is t and got[2].rows is t and got[2].name == "x"
    assert got[3:] == (5, None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA memory pools: a GPU's")
def test_what_the_judge_keeps_lies_in_no_segment_it_shares_with_a_kernel():
    shared = torch.ones(1000, device="cuda")  # an input, as the kernel's process would map it
    segment = kernel_client.allocation_of(shared.data_ptr(), shared.device)[0]
    plain = torch.zeros(1000, device="cuda", dtype=torch.float64)
    assert kernel_client.allocation_of(plain.data_ptr(), plain.device)[0] == segment  # the exposure
    kept = judge_memory.kept((plain, _Kept(plain, "rows")))
    assert torch.equal(kept[0], plain) and torch.equal(kept[1].rows, plain)
    for t in (kept[0], kept[1].rows):
        assert kernel_client.allocation_of(t.data_ptr(), t.device)[0] != segment
    case = Case(batch=1, seqlen_q=64, seqlen_k=64, nheads=2, head_dim=32, dtype="fp16", seed=3)
    reference = expected.expected(case, "cuda", "zeros", True)  # cached for the next backends
    inputs = make_inputs(case, "cuda")  # what the next backend's kernel gets
    shared_segments = {kernel_client.allocation_of(t.data_ptr(), t.device)[0] for t in (inputs.q, inputs.k, inputs.v)}
    for t in (reference.out, *reference.grads):
        assert kernel_client.allocation_of(t.data_ptr(), t.device)[0] not in shared_segments
