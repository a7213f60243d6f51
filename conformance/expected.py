"""What a case's result must be: the float64 reference, and the same-precision PyTorch error that
scales its tolerance (tolerance.py), for the output and, when asked, for dq, dk, dv.

It depends only on the case, the device and the declared masked-row convention, so the last one is
kept: consecutive tests of several backends on one case compute it once.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import torch

from conformance import judge_memory, reference, threads
from conformance.case import Case
from conformance.inputs import Inputs, make_inputs
from conformance.tolerance import max_abs_error

GRAD_NAMES = ("dq", "dk", "dv")


@dataclass
class Expected:
    out: torch.Tensor  # float64
    out_torch_error: float
    out_magnitude: float  # the terms' magnitude (reference.term_magnitudes), for the tolerance's floor
    logit_magnitude: float  # that of the logits' terms, for the tolerance's logit-rounding term
    grads: tuple[torch.Tensor, ...] | None  # float64 dq, dk, dv
    grad_torch_errors: tuple[float, ...] | None
    grad_magnitudes: tuple[float, ...] | None
    # causal masks and windows: the output's rows by how many keys they see (reference.length_classes),
    # each with its own yardstick error and terms' magnitude; None when all rows see as many keys
    out_classes: tuple[RowClass, ...] | None = None


@dataclass(frozen=True)
class RowClass:
    fewest: int  # keys the rows of the class see, at least and at most
    most: int
    rows: torch.Tensor  # query row indices
    torch_error: float
    magnitude: float


def _attention_and_grads(inputs: Inputs, case: Case, grads: bool, upcast: bool = True, **kwargs):
    """Output (and dq, dk, dv) of the formula; float64 leaves when ``upcast``, so gradients stay float64.
    Not upcast, the leaves are in the case's dtype and the gradients come back rounded to it."""
    dtype = torch.float64 if upcast else case.torch_dtype
    leaves = tuple(t.detach().to(dtype).requires_grad_(grads) for t in (inputs.q, inputs.k, inputs.v))
    with torch.enable_grad():
        out = reference.attention(*leaves, case, upcast=upcast, **kwargs)
        if not grads:
            return out.detach(), None
        return out.detach(), torch.autograd.grad(out, leaves, inputs.dout.to(dtype))


def yardstick_precisions(dtype: torch.dtype, accumulation: str) -> tuple[str, ...]:
    """The emulated computations whose error scales the tolerance (reference.PRECISIONS): for 16-bit
    inputs, those of a kernel that accumulates in float32 ("fp32", the default declaration, as
    FlashAttention kernels do), or in the input dtype ("input", plain PyTorch in fp16/bf16); for fp32
    and fp64 inputs the computation in the dtype itself."""
    if dtype not in (torch.float16, torch.bfloat16):
        return ("input",)
    return ("input",) if accumulation == "input" else ("fp32", "fp32_p")


def gradient_precisions(dtype: torch.dtype, accumulation: str) -> tuple[str, ...]:
    """For dq, dk, dv of 16-bit inputs, the input-dtype computation too: a FlashAttention backward
    recomputes P from the forward's log-sum-exp and takes D from the 16-bit output, and where logits
    are large and the gradient cancels (a peaked softmax) its error depends on how the forward and
    backward scores were summed, which no single float32 evaluation order reproduces (flash-attn on the
    H100: dq 11x the float32 yardstick on a decode case with logits ~256; docs/tolerance.md). The
    outputs keep the float32 yardstick."""
    own = yardstick_precisions(dtype, accumulation)
    return own if "input" in own else (*own, "input")


def _precisions(dtype: torch.dtype, accumulation: str, grads: bool) -> tuple[str, ...]:
    return gradient_precisions(dtype, accumulation) if grads else yardstick_precisions(dtype, accumulation)


def _orders(precision: str) -> tuple[str, ...]:
    # the tensor-core rounding of P is one more variant of the two orders kernels use
    return reference.ORDERS if precision != "fp32_p" else ("scale_q", "exp2")


# A case's Expected is made of parts, each kept for the next backend on the case (consecutive tests of
# several backends run one case in a row): the float64 reference with the terms' magnitudes, and the
# error of each emulated precision. Backends whose declarations differ (one accumulating in the input
# dtype, one in float32) then share what is the same for both.
CACHED = 48
_REFERENCES: OrderedDict = OrderedDict()  # (case, device, masked_rows, grads) -> _compute's parts
_ERRORS: OrderedDict = OrderedDict()  # the same + (precision,) -> (output, [dq, dk, dv], [row classes'] errors)
_LOCK = threading.Lock()


def _remember(cache: OrderedDict, key, value) -> None:
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > CACHED * (1 if cache is _REFERENCES else 2):
        cache.popitem(last=False)


def _normalised(case: Case, masked_rows: str, accumulation: str) -> tuple[str, str]:
    if reference.fully_masked_rows(case) is None:
        masked_rows = "zeros"  # the convention cannot matter: share the entry
    if case.torch_dtype not in (torch.float16, torch.bfloat16):
        accumulation = "fp32"
    return masked_rows, accumulation


def expected(case: Case, device: str, masked_rows: str, grads: bool, accumulation: str = "fp32") -> Expected:
    """For the case's own inputs (``inputs.make_inputs``). Its parts are kept for the last cases seen, so
    that several backends on one case (and self-tests running many backends over one grid) compute
    each once; what ``soon`` started is waited for, not computed again."""
    masked_rows, accumulation = _normalised(case, masked_rows, accumulation)
    keys = [(case, device, masked_rows, grads)] + ([] if grads else [(case, device, masked_rows, True)])
    with _LOCK:
        started = [_PENDING.pop(k) for k in keys if k in _PENDING]
    wait(started)  # all of them, before an error of one is raised
    for future in started:
        future.result()  # its error, if any, is this call's: as if computed here
    return _expected(case, device, masked_rows, grads, accumulation)


def _expected(case: Case, device: str, masked_rows: str, grads: bool, accumulation: str) -> Expected:
    key = (case, device, masked_rows, grads)
    precisions = _precisions(case.torch_dtype, accumulation, grads)
    with _LOCK:
        with_grads = (*key[:3], True)
        if not grads and with_grads in _REFERENCES and all((*with_grads, p) in _ERRORS for p in precisions):
            key = with_grads  # the output's parts, kept with the gradients' when those were asked for first
        parts = _REFERENCES.get(key)
        errors = {p: _ERRORS[(*key, p)] for p in precisions if (*key, p) in _ERRORS}
    missing = [p for p in precisions if p not in errors]
    if parts is None or missing:
        fresh = parts is None
        parts, computed = _compute(make_inputs(case, device), case, masked_rows, grads, missing, parts)
        if fresh:
            parts = judge_memory.kept(parts)  # kept for the next backends, out of their kernels' reach
        errors.update(computed)
        with _LOCK:
            _remember(_REFERENCES, key, parts)
            for p, e in computed.items():
                _remember(_ERRORS, (*key, p), e)
    return _combine(case, accumulation, grads, parts, errors)


# The judge's reference need not wait for the kernel: ``checks.execute`` starts what a check compares
# with (``soon``, from the check's ``reference``) before the check calls the kernel, and it is computed
# in a thread of the judge while the kernel's process computes the case; ``expected`` then waits for it.
# On a machine with a core for each, the two overlap (the CPU quick tier's fuzz of dropout, attn_bias
# and gradients: 27.6 s -> 24.5 s). Only where the judge computes on the CPU: on a GPU both would queue
# on the one device. ``settle`` ends it with the case, so nothing of it runs while another case is
# measured. The thread is a daemon: an interrupted run does not wait for it.
_PENDING: dict = {}  # expected()'s key -> the Future computing it


def soon(case: Case, device: str, masked_rows: str, grads: bool, accumulation: str = "fp32") -> None:
    """Start computing what ``expected`` will be asked with these arguments, in the background."""
    if torch.device(device).type != "cpu":
        return
    masked_rows, accumulation = _normalised(case, masked_rows, accumulation)
    key = (case, device, masked_rows, grads)
    future: Future = Future()
    with _LOCK:
        if key in _PENDING:
            return
        _PENDING[key] = future

    def compute():
        future.set_running_or_notify_cancel()
        try:
            future.set_result(_expected(case, device, masked_rows, grads, accumulation))
        except BaseException as exc:  # noqa: BLE001 - the caller's to raise (expected) or drop (settle)
            future.set_exception(exc)

    try:
        threading.Thread(target=compute, name="attn-expected", daemon=True).start()
    except RuntimeError:  # no thread to be had: computed when asked for, as without ``soon``
        with _LOCK:
            _PENDING.pop(key, None)


def settle() -> None:
    """Wait for what ``soon`` started and no ``expected`` took (a case that ended before it compared:
    the result stays cached, an error is dropped, as nothing needed it)."""
    with _LOCK:
        started = list(_PENDING.values())
        _PENDING.clear()
    for future in started:
        future.exception()


def expected_for(inputs: Inputs, case: Case, masked_rows: str, grads: bool, accumulation: str = "fp32") -> Expected:
    """For given inputs of the case's shape (a sequence cut from a packed batch, a filled KV cache)."""
    parts, errors = _compute(inputs, case, masked_rows, grads, _precisions(case.torch_dtype, accumulation, grads))
    return _combine(case, accumulation, grads, parts, errors)


# Cases with at least this many scores (batch x heads x seqlen_q x seqlen_k) have their parts computed
# in parallel threads (threads.reference_workers()): each part is a long sequence of large tensor
# operations, which release the GIL; smaller cases are computed in order (threads would only contend).
PARALLEL_SCORES = 1 << 18


def _compute(inputs: Inputs, case: Case, masked_rows: str, grads: bool, precisions, parts=None):
    """The reference parts (unless given: the float64 output and gradients, the terms' magnitudes, the
    output's row classes with their rows' magnitudes) and the errors of ``precisions``: (parts,
    {precision: (output error, [dq, dk, dv errors], [each row class's output error])}). The parts are
    independent computations, each giving the same numbers whatever thread runs it."""
    classes = parts[3] if parts is not None else reference.length_classes(case, inputs.q.device)
    emulated = [("emulated", p, order) for p in precisions for order in _orders(p)]
    jobs = [] if parts is not None else [("reference",), ("magnitudes",)] + ([("rows",)] if classes else [])
    jobs += emulated

    def run(job):
        if job[0] == "reference":
            return _attention_and_grads(inputs, case, grads, masked_rows=masked_rows)
        if job[0] == "magnitudes":
            return reference.term_magnitudes(inputs.q, inputs.k, inputs.v, inputs.dout, case, masked_rows)
        if job[0] == "rows":
            return reference.output_row_magnitudes(inputs.q, inputs.k, inputs.v, case, masked_rows)
        _, precision, order = job
        p_out, p_grads = _attention_and_grads(inputs, case, grads, upcast=False, masked_rows=masked_rows,
                                              order=order, precision=precision)
        flash_grads = reference.flash_backward(inputs.q, inputs.k, inputs.v, inputs.dout, case, masked_rows=masked_rows,
                                               order=order, precision=precision) if grads else None
        return p_out, p_grads, flash_grads

    workers = threads.reference_workers()
    if workers > 1 and len(jobs) > 1 and case.batch * case.nheads * case.seqlen_q * case.seqlen_k >= PARALLEL_SCORES:
        with ThreadPoolExecutor(min(workers, len(jobs)), thread_name_prefix="attn-reference") as pool:
            results = list(pool.map(run, jobs))
    else:
        results = [run(job) for job in jobs]
    if parts is None:
        (out, ref_grads), magnitudes, *results = results
        row_terms = results.pop(0) if classes else None
        parts = (out, ref_grads, magnitudes, classes, row_terms)
    out, ref_grads = parts[:2]
    errors = {p: (0.0, [0.0, 0.0, 0.0], [0.0] * len(classes or ())) for p in precisions}
    for (_, precision, _), (p_out, p_grads, flash_grads) in zip(emulated, results):
        out_err, grad_errs, class_errs = errors[precision]
        out_err = max(out_err, max_abs_error(p_out, out))
        class_errs = [max(e, max_abs_error(p_out[:, rows], out[:, rows]))
                      for e, (_, _, rows) in zip(class_errs, classes or ())]
        if grads:
            grad_errs = [max(e, max_abs_error(g1, r), max_abs_error(g2, r))
                         for e, g1, g2, r in zip(grad_errs, p_grads, flash_grads, ref_grads)]
        errors[precision] = (out_err, grad_errs, class_errs)
    return parts, errors


def _combine(case: Case, accumulation: str, grads: bool, parts, errors: dict) -> Expected:
    """The Expected of a declaration: the output's errors (whole and per row class) over its yardstick
    precisions; the gradients' over the gradient precisions (which add the input-dtype computation for
    16-bit inputs)."""
    out, ref_grads, magnitudes, classes, row_terms = parts
    own = yardstick_precisions(case.torch_dtype, accumulation)
    out_err = max(errors[p][0] for p in own)
    grad_errs = [max(errors[p][1][i] for p in errors) for i in range(3)]
    out_classes = None
    if classes:
        out_classes = tuple(RowClass(lo, hi, rows, max(errors[p][2][i] for p in own), float(row_terms[rows].max()))
                            for i, (lo, hi, rows) in enumerate(classes))
    return Expected(out, out_err, magnitudes[0], magnitudes[4], ref_grads if grads else None,
                    tuple(grad_errs) if grads else None,
                    magnitudes[1:4] if grads else None, out_classes)
