"""A backend: an attention function in flash-attn's calling convention plus what it declares.

The convention is ``fn(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, ...)`` with q of
shape (batch, seqlen_q, nheads, head_dim) and k, v of shape (batch, seqlen_k, nheads_k, head_dim),
returning out shaped like q, or a tuple whose first item is out. ``call`` is the only place that turns
a case into keyword arguments, so every check calls every backend the same way.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from conformance import features
from conformance.capabilities import Capabilities
from conformance.case import Case


class Unsupported(Exception):
    """Raised by an adapter when the library it wraps refuses a case at run time, with the library's
    own reason (e.g. SDPA pinned to one kernel). The case is skipped with that reason, never passed."""


class ContractError(Exception):
    """The backend returned something that is not attention's output for these inputs."""


class OutOfMemory(Exception):
    """The case needed more memory than the device had: a result of its own ("oom"), not a failure."""


class DeviceFault(Exception):
    """A device error that poisons the process's CUDA context (illegal memory access, device-side
    assert, launch failure): every later call in this process would fail, so the case is "crashed"
    and the process that ran it is replaced."""


class KernelRaised(Exception):
    """The kernel raised an exception inside its declaration: a failure of the check (``raised``)."""


class KernelCrashed(Exception):
    """The kernel's process died during a call (a signal, an exit)."""


class KernelTimedOut(Exception):
    """A call into the kernel did not return within the limit; its process was killed."""


# torch adds "Compile with `TORCH_USE_CUDA_DSA` to enable device-side assertions." to every CUDA error: the
# assert's own text is "device-side assert triggered"; the rest are CUDA's other sticky errors (a launch the
# watchdog ended, a hardware stack error, an invalid program counter or address space, an ECC error)
_DEVICE_FAULT_MARKERS = ("illegal memory access", "device-side assert triggered", "unspecified launch failure",
                         "misaligned address", "an illegal instruction", "CUDA error: unknown error",
                         "cudaErrorLaunchFailure", "CUBLAS_STATUS_EXECUTION_FAILED",
                         "the launch timed out and was terminated", "hardware stack error", "invalid program counter",
                         "operation not supported on global/shared address space", "uncorrectable ECC error")


# the device's own allocation failures outside torch's allocator (CUDA's cudaErrorMemoryAllocation, which
# does not poison the context; cuBLAS failing to allocate its handle), as raised through torch and Triton
_DEVICE_OOM_MARKERS = ("CUDA error: out of memory", "CUDA driver error: out of memory", "CUBLAS_STATUS_ALLOC_FAILED",
                       "Triton Error [CUDA]: out of memory")


def classify(exc: BaseException) -> type[Exception] | None:
    """OutOfMemory for the allocators' own errors (torch.OutOfMemoryError, MemoryError, the CPU
    allocator's failed allocation, which torch raises as a RuntimeError of c10's "enforce fail at
    alloc_cpu", and the device's, ``_DEVICE_OOM_MARKERS``), never for other text that mentions memory;
    DeviceFault for context-poisoning device errors; else None."""
    import torch

    cause, seen = exc, 0
    while cause is not None and seen < 8:  # torch.compile wraps the error (BackendCompilerFailed.inner_exception)
        if isinstance(cause, (torch.OutOfMemoryError, MemoryError)):
            return OutOfMemory
        cause, seen = getattr(cause, "inner_exception", None) or cause.__cause__, seen + 1
    text = str(exc)
    if isinstance(exc, RuntimeError) and text.startswith("[enforce fail at alloc_cpu") \
            and "DefaultCPUAllocator: can't allocate memory" in text:
        return OutOfMemory
    if isinstance(exc, RuntimeError) and any(marker in text for marker in _DEVICE_OOM_MARKERS):
        return OutOfMemory
    if any(marker in text for marker in _DEVICE_FAULT_MARKERS):
        return DeviceFault
    return None


def invoke(backend: Backend | None, fn: Callable, *args, **kwargs):
    """Call a backend's function, sorting what it raises: ``Unsupported`` as is where the backend may
    refuse at run time (``may_refuse``), else as a failure; the allocator's out-of-memory and
    context-poisoning errors as ``OutOfMemory`` and ``DeviceFault``; a call its signature refuses as
    ``ContractError``; anything else as ``KernelRaised``, with where it was raised."""
    name = backend.name if backend is not None else "?"
    try:
        return fn(*args, **kwargs)
    except Unsupported as exc:
        if backend is not None and backend.may_refuse:
            raise
        raise KernelRaised(f"refused a case inside its declaration (Unsupported: {exc}); a plain function "
                           "declares what it supports in conformance_capabilities instead") from exc
    except (KernelRaised, KernelCrashed, KernelTimedOut, OutOfMemory, DeviceFault, ContractError):
        raise  # already sorted (a function that runs in the kernel's process)
    except Exception as exc:
        kind = classify(exc)
        if kind is not None:
            raise kind(f"{type(exc).__name__}: {exc}") from exc
        frames = traceback.extract_tb(exc.__traceback__)
        if isinstance(exc, TypeError) and len(frames) == 1:  # refused by the signature, before its first line
            raise ContractError(f"backend {name!r} cannot be called in flash-attn's convention: {exc}") from exc
        where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
        raise KernelRaised(f"{type(exc).__name__} at {where}: {exc}") from exc


def always_available() -> list[str]:
    return []


@dataclass(frozen=True)
class Backend:
    """``fn`` follows ``flash_attn_func``; ``varlen_fn`` (declared by ``varlen``) follows
    ``flash_attn_varlen_func`` and ``kvcache_fn`` (declared by ``kvcache``) ``flash_attn_with_kvcache``."""

    name: str
    fn: Callable
    capabilities: Capabilities
    description: str = ""
    # Reasons the backend cannot run on this machine (missing package, no kernels for this GPU...);
    # empty when it can. Called lazily, so listing backends never imports a heavy package twice.
    unavailable_reasons: Callable[[], list[str]] = field(default=always_available, compare=False)
    varlen_fn: Callable | None = None
    kvcache_fn: Callable | None = None
    # An adapter over a library that decides at run time may raise Unsupported for a case inside its
    # declaration (a skip with the library's reason); a plain function (an import string) may not: there
    # a refusal is a failure, or every case a kernel gets wrong could be hidden as a skip.
    may_refuse: bool = True
    # Each new variant (head dim, dtype, layout, mask, scale, features) is a compilation (seconds to minutes):
    # the fuzz test then draws its variants from the grid's, which the grid compiles anyway (fuzz.py).
    compiled: bool = False
    # Set on a backend whose functions run in the kernel's process (kernel_client.py): runs a measuring
    # procedure of kernel_side.PROCEDURES there. None: the backend runs here.
    kernel_side: Callable | None = field(default=None, compare=False)

    def __post_init__(self):
        for feature in ("varlen", "kvcache"):
            if getattr(self.capabilities, feature) and getattr(self, f"{feature}_fn") is None:
                raise ValueError(f"backend {self.name!r} declares {feature} but has no {feature}_fn")
        if self.capabilities.mixed_batch and self.varlen_fn is None:
            raise ValueError(f"backend {self.name!r} declares mixed_batch (called through varlen_fn) but has no "
                             "varlen_fn")


def run_kernel_side(backend: Backend, procedure: str, *args):
    """A measurement that must run where the kernel runs (its process, its CUDA allocator and clocks):
    ``kernel_side.PROCEDURES[procedure](backend, *args)``, there; it returns numbers, the caller judges."""
    if backend.kernel_side is not None:
        return backend.kernel_side(procedure, *args)
    from conformance.kernel_side import PROCEDURES

    try:
        return PROCEDURES[procedure](backend, *args)
    except Exception as exc:
        kind = classify(exc)
        if kind is not None:  # as the kernel's process reports it
            raise kind(f"{type(exc).__name__}: {exc}") from exc
        raise


def kwargs_for(backend: Backend, case: Case, device) -> dict:
    """The keyword arguments that ask ``backend`` for ``case`` in flash-attn's convention.

    Optional arguments are passed only when the case uses them, so a function that lacks one still
    runs every case that does not need it. A backend declaring both causal alignments also receives
    ``causal_alignment`` ("bottom_right" or "top_left").
    """
    kwargs: dict = {"causal": case.causal is not None}
    if case.softmax_scale is not None:
        kwargs["softmax_scale"] = case.softmax_scale
    if case.causal is not None and len(backend.capabilities.causal) > 1:
        kwargs["causal_alignment"] = case.causal
    for feature in features.present(case):
        kwargs.update(feature.kwargs(case, device))
    return kwargs


def call(backend: Backend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, case: Case, **extra) -> torch.Tensor:
    """Run the backend and hold its result to the output contract (a tensor shaped like q, same dtype
    and device), so a wrong return is reported as such rather than as a numerical mismatch."""
    return checked_output(backend, invoke(backend, backend.fn, q, k, v, **kwargs_for(backend, case, q.device),
                                          **extra), q)


def call_varlen(backend: Backend, q, k, v, cu_seqlens: torch.Tensor, max_seqlen: int, case: Case) -> torch.Tensor:
    """``flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, ...)``
    on packed (total_tokens, heads, head_dim) tensors."""
    kwargs = kwargs_for(backend, case, q.device)
    kwargs.pop("causal_alignment", None)  # each packed sequence is square: the alignments coincide
    out = invoke(backend, backend.varlen_fn, q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kwargs)
    return checked_output(backend, out, q)


def call_kvcache(backend: Backend, q, k_cache, v_cache, k_new, v_new, cache_seqlens: torch.Tensor,
                 case: Case, block_table: torch.Tensor | None = None) -> torch.Tensor:
    """``flash_attn_with_kvcache(q, k_cache, v_cache, k=..., v=..., cache_seqlens=..., ...)``: the new
    keys and values are written into the caches at cache_seqlens, then q attends to the filled part.
    A paged cache (case.page_block) comes with ``block_table=``."""
    kwargs = kwargs_for(backend, case, q.device)
    kwargs.pop("causal_alignment", None)  # decoding is bottom-right aligned by definition
    if block_table is not None:
        kwargs["block_table"] = block_table
    out = invoke(backend, backend.kvcache_fn, q, k_cache, v_cache, k=k_new, v=v_new, cache_seqlens=cache_seqlens,
                 **kwargs)
    return checked_output(backend, out, q)


def checked_output(backend: Backend, out, q: torch.Tensor) -> torch.Tensor:
    """``out`` (or its first item), if it is a tensor shaped like q with q's dtype and device."""
    if isinstance(out, (tuple, list)) and out:
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise ContractError(f"backend {backend.name!r} returned {type(out).__name__}, not a tensor")
    problems = []
    if tuple(out.shape) != tuple(q.shape):
        problems.append(f"shape {tuple(out.shape)} instead of q's {tuple(q.shape)}")
        if q.dim() == 4 and tuple(out.shape) == (q.shape[0], q.shape[2], q.shape[1], q.shape[3]):
            problems.append("which is (batch, heads, seqlen, head_dim): the convention is (batch, seqlen, heads, "
                            "head_dim), so transpose(1, 2) the output (and check the inputs' layout)")
    if out.dtype != q.dtype:
        problems.append(f"dtype {out.dtype} instead of q's {q.dtype}")
    if out.device != q.device:
        problems.append(f"device {out.device} instead of q's {q.device}")
    if problems:
        raise ContractError(f"backend {backend.name!r} returned " + ", ".join(problems))
    return out
