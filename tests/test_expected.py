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
    # per convention: "input" once, then only what fp32 adds; nothing for the third backend, nothing for
    # the output alone once the gradients' entry holds it
    firsts = [c for c in computed if isinstance(c, list) and c]  # expected(); expected_for() passes a tuple
    assert firsts == [["input"], ["fp32", "fp32_p"]] * 2, computed


def test_reference_workers_follow_the_user_and_the_cores(monkeypatch):
    monkeypatch.setattr(threads, "cores_available", lambda: 16)
    assert threads.reference_workers({}) == threads.MAX_REFERENCE_WORKERS
    assert threads.reference_workers({"OMP_NUM_THREADS": "1"}) == 1
    assert threads.reference_workers({"MKL_NUM_THREADS": "3"}) == 3
    monkeypatch.setattr(threads, "cores_available", lambda: 1)
    assert threads.reference_workers({}) == 1


def test_a_reference_started_soon_is_computed_once_in_the_background_and_waited_for(monkeypatch):
    import threading

    case = Case.from_id("b1_q47_k33_h2_kv1_d16_fp32_causalbr_seed11")
    gate, where = threading.Event(), []
    real = ex._compute

    def gated(*args, **kwargs):
        gate.wait(30)
        where.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(ex, "_compute", gated)
    ex.soon(case, "cpu", "zeros", True)
    assert where == [] and ex._PENDING  # running, held at the gate: the caller went on
    gate.set()
    got = ex.expected(case, "cpu", "zeros", False)  # the output alone: from the gradients' entry, waited for
    assert len(where) == 1 and where[0].startswith("attn-expected") and not ex._PENDING
    assert _same(got, ex.expected_for(ex.make_inputs(case, "cpu"), case, "zeros", False))
    ex.soon(case.replace(seed=12), "cuda", "zeros", False)  # the judge computes on the GPU there: not started
    assert not ex._PENDING


def test_settle_waits_for_what_nothing_took_and_an_error_belongs_to_the_check_that_asks(monkeypatch):
    import pytest

    def fails(*args, **kwargs):
        raise RuntimeError("a bug of the reference")

    monkeypatch.setattr(ex, "_compute", fails)
    first, second = (Case.from_id(f"b1_q8_k8_h1_d8_fp32_seed{s}") for s in (13, 14))
    ex.soon(first, "cpu", "zeros", False)
    ex.settle()  # the case ended before it compared: nothing needed it, nothing is raised
    assert not ex._PENDING
    ex.soon(second, "cpu", "zeros", False)
    with pytest.raises(RuntimeError, match="a bug of the reference"):
        ex.expected(second, "cpu", "zeros", False)


def test_a_case_that_ends_before_comparing_leaves_nothing_running(monkeypatch):
    import dataclasses

    import pytest

    from conformance.backend import Unsupported
    from conformance.backends.naive import BACKEND
    from conformance.checks import execute

    def refuses(*args, **kwargs):
        raise Unsupported("not this one")

    started, real = [], ex.soon
    monkeypatch.setattr(ex, "soon", lambda *a, **k: started.append(a) or real(*a, **k))
    with pytest.raises(Unsupported):
        execute("forward", dataclasses.replace(BACKEND, fn=refuses), Case.from_id("b1_q8_k8_h1_d8_fp32_seed15"), "cpu")
    assert started and not ex._PENDING  # started with the case, settled when it ended


def test_each_check_declares_the_reference_its_run_compares_with(monkeypatch):
    """``Check.reference`` is what ``execute`` starts in the background: a check that computes its own
    case's reference in the main thread declared too little (or nothing) and loses the overlap."""
    import threading

    from conformance import grid
    from conformance.backends import naive, tiled
    from conformance.checks import CHECKS, execute

    where, real = [], ex._compute
    monkeypatch.setattr(ex, "_compute", lambda inputs, case, *a, **k:
                        where.append((case, threading.current_thread().name)) or real(inputs, case, *a, **k))
    for name, check in CHECKS.items():
        if check.measures:
            continue
        backend, case = next((b, r.case) for b in (naive.BACKEND, tiled.BACKEND)
                             for r in grid.for_backend(check, b.capabilities, "cpu", "quick") if r.case)
        where.clear()
        ex._REFERENCES.clear()  # nothing kept from an earlier check's case
        ex._ERRORS.clear()
        assert execute(name, backend, case, "cpu").passed, name
        threads = [w for c, w in where if c == case]
        assert threads == (["attn-expected"] if check.reference else []), (name, threads)
