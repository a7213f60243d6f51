"""`flash`: the flash-attn package's 2.x API -- ``flash_attn_func``, ``flash_attn_varlen_func`` and
``flash_attn_with_kvcache`` (bottom-right causal, GQA/MQA, window, softcap, ALiBi, deterministic
backward). flash-attn 2.x needs compute capability 8.0 (Ampere) or newer.

A build may hold kernels for only some head dims (a build trimmed to save compile time; one that runs
an absent kernel can kill its process). The head dims are read from the installed library's symbol
table, without loading it: a head dim d runs the kernel for the first of 32, 64, 96, 128, 192, 256 at or
above it (flash-attn's HEADDIM_SWITCH), so the declaration covers exactly the ranges whose forward and
backward kernels are present.
"""

from __future__ import annotations

import importlib.util
import re

from conformance.backend import Backend, Unsupported
from conformance.backends.requirements import cuda_reasons, import_reasons, package_reasons
from conformance.capabilities import Capabilities

KERNEL_HEAD_DIMS = (32, 64, 96, 128, 192, 256)
INSTALL = "pip install flash-attn --no-build-isolation"


def built_head_dims(library_path: str) -> frozenset[int] | None:
    """Head dims whose forward and backward kernels the library contains; None when unreadable."""
    try:
        with open(library_path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    found = {}
    for direction in ("fwd", "bwd"):
        pattern = rb"run_mha_" + direction.encode() + rb"_IN7cutlass(?:6half_t|10bfloat16_t)ELi(\d+)ELb"
        found[direction] = {int(d) for d in re.findall(pattern, data)}
    kernels = found["fwd"] & found["bwd"]
    if not kernels:
        return None
    dims = set()
    for lower, upper in zip((0, *KERNEL_HEAD_DIMS), KERNEL_HEAD_DIMS):
        if upper in kernels:
            dims.update(range(lower + 1, upper + 1))
    return frozenset(dims)


def installed_head_dims() -> dict:
    """The head_dims declaration for the installed flash-attn build: {} when it has every kernel."""
    try:
        spec = importlib.util.find_spec("flash_attn_2_cuda")
    except (ImportError, ValueError):
        spec = None
    dims = built_head_dims(spec.origin) if spec is not None and spec.origin else None
    return {} if dims is None or dims == frozenset(range(1, 257)) else {"head_dims": dims}


def unavailable_reasons() -> list[str]:
    return (package_reasons("flash_attn", INSTALL)
            or cuda_reasons((8, 0), "flash-attn 2.x (the lab notes' 'compute capability 7.5+' is out of date)")
            or import_reasons("flash_attn_2_cuda"))


def attention(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
              alibi_slopes=None, deterministic=False):
    if dropout_p and softcap:  # the library's own refusal, one combination of two declared features
        raise Unsupported("flash-attn 2.x refuses softcap with dropout ('Softcapping does not support dropout for now')")
    from flash_attn import flash_attn_func

    return flash_attn_func(q, k, v, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal,
                           window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
                           deterministic=deterministic)


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **kwargs):
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **kwargs)


def kvcache_attention(q, k_cache, v_cache, **kwargs):
    from flash_attn import flash_attn_with_kvcache

    return flash_attn_with_kvcache(q, k_cache, v_cache, **kwargs)


BACKEND = Backend(
    name="flash",
    fn=attention,
    capabilities=Capabilities(devices=frozenset({"cuda"}), dtypes=frozenset({"fp16", "bf16"}), memory="linear",
                              window=True, softcap=True, alibi=True, varlen=True, kvcache=True,
                              paged_kv=True, page_block_multiple=256, dropout=True,  # "Paged KV cache block size must be
                              # divisible by 256" (flash-attn 2.x's flash_attn_with_kvcache)
                              # flash_attn_varlen_func with block_table: the kvcache check's 7 mixed prefill/decode
                              # cases passed on an H200 (flash-attn 2.8.3)
                              mixed_batch=True,
                              deterministic_backward=True, **installed_head_dims()),
    description="flash-attn 2.x: flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache",
    unavailable_reasons=unavailable_reasons,
    varlen_fn=varlen_attention,
    kvcache_fn=kvcache_attention,
)
