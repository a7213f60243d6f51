"""`sdpa-flash`: torch SDPA pinned to its FlashAttention-2 kernel (CUDA, 16-bit, head dim <= 256)."""

import torch
from torch.nn.attention import SDPBackend

from conformance.backend import Backend
from conformance.backends.requirements import cuda_reasons
from conformance.backends.sdpa import pinned
from conformance.capabilities import Capabilities


def unavailable_reasons() -> list[str]:
    reasons = cuda_reasons((8, 0), "SDPA's flash kernel")
    if not reasons and not torch.backends.cuda.is_flash_attention_available():
        reasons.append(f"torch {torch.__version__} was built without its flash attention kernel")
    return reasons


BACKEND = Backend(
    name="sdpa-flash",
    # is_causal (top-left) with seqlen_q != seqlen_k is refused by torch for this kernel (seen on an H100,
    # torch 2.11); bottom-right runs natively through causal_lower_right.
    fn=pinned(SDPBackend.FLASH_ATTENTION, default_alignment="bottom_right"),
    capabilities=Capabilities(devices=frozenset({"cuda"}), dtypes=frozenset({"fp16", "bf16"}), head_dim_max=256,
                              causal=("bottom_right",), memory="linear", dropout=True),
    description="torch SDPA pinned to SDPBackend.FLASH_ATTENTION",
    unavailable_reasons=unavailable_reasons,
)
