"""`flash4`: FlashAttention-4 (the flash-attn-4 package's ``flash_attn.cute``, written in CuTe DSL; it
needs ``nvidia-cutlass-dsl``), for Hopper and Blackwell GPUs."""

from __future__ import annotations

from conformance.backend import Backend
from conformance.backends.requirements import cuda_reasons, import_reasons, package_reasons
from conformance.capabilities import Capabilities


def unavailable_reasons() -> list[str]:
    return (package_reasons("flash_attn", "pip install flash-attn-4") or cuda_reasons((9, 0), "FlashAttention-4")
            or import_reasons("flash_attn.cute"))


def attention(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0):
    from flash_attn.cute import flash_attn_func

    left, right = window_size
    return flash_attn_func(q, k, v, softmax_scale=softmax_scale, causal=causal,
                           window_size=(None if left < 0 else left, None if right < 0 else right), softcap=softcap)


BACKEND = Backend(
    name="flash4",
    fn=attention,
    capabilities=Capabilities(devices=frozenset({"cuda"}), dtypes=frozenset({"fp16", "bf16"}), head_dim_min=8,
                              head_dim_max=128, head_dim_multiple=8, memory="linear", window=True, softcap=True),
    description="FlashAttention-4 (flash_attn.cute.flash_attn_func)",
    unavailable_reasons=unavailable_reasons,
)
