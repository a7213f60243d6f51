"""Backends that die the ways real kernels do, each only on some inputs; correct elsewhere.

Loaded by import string (tests/crashers.py:NAME) so the worker process can load them too.
"""

import ctypes
import os
import time

import torch

from conformance.backends import naive


def _correct(q, k, v, **kwargs):
    return naive.attention(q, k, v, **kwargs)


def segfaults_at_17(q, k, v, **kwargs):
    """Reads address 0 when seqlen_q is 17."""
    if q.shape[1] == 17:
        ctypes.string_at(0)
    return _correct(q, k, v, **kwargs)


def aborts_at_d59(q, k, v, **kwargs):
    """Calls abort() for head dim 59, as a failed C++ assertion does."""
    if q.shape[-1] == 59:
        os.abort()
    return _correct(q, k, v, **kwargs)


def hangs_on_gqa(q, k, v, **kwargs):
    """Never returns when nheads_k < nheads, as a deadlocked kernel does."""
    if k.shape[2] < q.shape[2]:
        time.sleep(3600)
    return _correct(q, k, v, **kwargs)


def cuda_error_on_packed(q, k, v, **kwargs):
    """Raises the error an illegal memory access raises in torch, for non-contiguous inputs."""
    if not q.is_contiguous():
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be "
                           "asynchronously reported at some other API call")
    return _correct(q, k, v, **kwargs)


def device_assert_on_causal(q, k, v, causal=False, **kwargs):
    if causal:
        raise RuntimeError("CUDA error: device-side assert triggered")
    return _correct(q, k, v, causal=causal, **kwargs)


def oom_on_batch1(q, k, v, **kwargs):
    if q.shape[0] == 1:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    return _correct(q, k, v, **kwargs)


def always_segfaults(q, k, v, **kwargs):
    ctypes.string_at(0)


def sleeps_then_works(q, k, v, **kwargs):
    """Slow but correct: for killing a run from outside while it is in a case."""
    if q.shape[1] == 65:
        time.sleep(30)
    return _correct(q, k, v, **kwargs)


for _fn in (segfaults_at_17, aborts_at_d59, hangs_on_gqa, cuda_error_on_packed, device_assert_on_causal, oom_on_batch1,
            always_segfaults, sleeps_then_works):
    _fn.conformance_capabilities = {"causal": ["bottom_right", "top_left"], "masked_rows": "mean_v"}
