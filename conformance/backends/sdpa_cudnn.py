"""`sdpa-cudnn`: torch SDPA pinned to its cuDNN attention kernel."""

import torch
from torch.nn.attention import SDPBackend

from conformance.backend import Backend
from conformance.backends.requirements import cuda_reasons
from conformance.backends.sdpa import pinned
from conformance.capabilities import Capabilities


def unavailable_reasons() -> list[str]:
    reasons = cuda_reasons((8, 0), "SDPA's cuDNN kernel")
    if not reasons and not torch.backends.cudnn.is_available():
        reasons.append("cuDNN is not available to torch")
    return reasons


BACKEND = Backend(
    name="sdpa-cudnn",
    fn=pinned(SDPBackend.CUDNN_ATTENTION),
    # head dims: torch selects cuDNN only for multiples of 8 ("head_dim should be a multiple of 8",
    # check_cudnn_tensor_shapes in torch's sdp_utils.cpp); undeclared, 14 of 15 fuzz draws on an H100 were
    # refused at run time, and grid intents were realised with head dims it refuses
    capabilities=Capabilities(devices=frozenset({"cuda"}), dtypes=frozenset({"fp16", "bf16"}), head_dim_max=128,
                              head_dim_multiple=8, causal=("top_left", "bottom_right"), memory="linear",
                              attn_bias=True, dropout=True),
    description="torch SDPA pinned to SDPBackend.CUDNN_ATTENTION",
    unavailable_reasons=unavailable_reasons,
)
