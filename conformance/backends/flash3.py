"""`flash3`: FlashAttention-3 (``flash_attn_interface``, built from hopper/ in the flash-attention
repository), for Hopper GPUs (sm_90)."""

from __future__ import annotations

from conformance.backend import Backend
from conformance.backends.requirements import cuda_reasons, import_reasons, package_reasons
from conformance.capabilities import Capabilities


def unavailable_reasons() -> list[str]:
    return (package_reasons("flash_attn_interface", "FlashAttention-3: python setup.py install in hopper/ of "
                            "Dao-AILab/flash-attention")
            or cuda_reasons((9, 0), "FlashAttention-3") or import_reasons("flash_attn_interface"))


def attention(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
              deterministic=False):
    from flash_attn_interface import flash_attn_func

    return flash_attn_func(q, k, v, softmax_scale=softmax_scale, causal=causal, window_size=window_size,
                           softcap=softcap, deterministic=deterministic)


BACKEND = Backend(
    name="flash3",
    fn=attention,
    capabilities=Capabilities(devices=frozenset({"cuda"}), dtypes=frozenset({"fp16", "bf16"}), head_dim_min=8,
                              head_dim_max=256, head_dim_multiple=8, memory="linear", window=True, softcap=True,
                              deterministic_backward=True),
    description="FlashAttention-3 (flash_attn_interface.flash_attn_func)",
    unavailable_reasons=unavailable_reasons,
)
