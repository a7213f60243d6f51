"""The reference's parts are shared between declarations and may be computed in threads: the numbers
stay those of one computation from scratch, bit for bit."""

import torch

from conformance import expected as ex
from conformance import threads
from conformance.case import Case


def _same(a: ex.Expected, b: ex.Expected) -> bool:
    return (torch.equal(a.out, b.out) and a.out_torch_error == b.out_torch_error
            and a.out_magnitude == b.out_magnitude and a.logit_magnitude == b.logit_magnitude
            and a.grad_torch_errors == b.grad_torch_errors and a.grad_magnitudes == b.grad_magnitudes
            and (a.grads is None) == (b.grads is None)
            and (a.grads is None or all(torch.equal(x, y) for x, y in zip(a.grads, b.grads)))
            and (a.out_classes is None) == (b.out_classes is None)
            and (a.out_classes is None or all(
                (x.fewest, x.most, x.torch_error, x.magnitude) == (y.fewest, y.most, y.torch_error, y.magnitude)
                and torch.equal(x.rows, y.rows) for x, y in zip(a.out_classes, b.out_classes))))


def test_parts_shared_across_declarations_and_threads_give_the_same_numbers(monkeypatch):
    case = Case.from_id("b1_q47_k33_h2_kv1_d16_bf16_causalbr_seed5")  # rows with no key: masked_rows matters
    monkeypatch.setattr(ex, "PARALLEL_SCORES", 1)  # threads even for this small case
    monkeypatch.setattr(threads, "reference_workers", lambda environ=None: 3)
    computed = []
    real = ex._compute
    monkeypatch.setattr(ex, "_compute", lambda *a, **k: computed.append(a[4]) or real(*a, **k))
    for grads in (True, False):
        for masked_rows in ("zeros", "mean_v"):
            for accumulation in ("input", "fp32", "fp32"):
                shared = ex.expected(case, "cpu", masked_rows, grads, accumulation)
                with monkeypatch.context() as m:
                    m.setattr(threads, "reference_workers", lambda environ=None: 1)
                    alone = ex.expected_for(ex.make_inputs(case, "cpu"), case, masked_rows, grads, accumulation)
                assert _same(shared, alone), (grads, masked_rows, accumulation)
    # per convention and gradients: "input" once, then only what fp32 adds; nothing for the third backend
    firsts = [c for c in computed if isinstance(c, list) and c]  # expected(); expected_for() passes a tuple
    assert firsts == [["input"], ["fp32", "fp32_p"]] * 4, computed


def test_reference_workers_follow_the_user_and_the_cores(monkeypatch):
    monkeypatch.setattr(threads, "cores_available", lambda: 16)
    assert threads.reference_workers({}) == threads.MAX_REFERENCE_WORKERS
    assert threads.reference_workers({"OMP_NUM_THREADS": "1"}) == 1
    assert threads.reference_workers({"MKL_NUM_THREADS": "3"}) == 3
    monkeypatch.setattr(threads, "cores_available", lambda: 1)
    assert threads.reference_workers({}) == 1
