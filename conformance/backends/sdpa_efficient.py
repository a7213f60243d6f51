"""`sdpa-efficient`: torch SDPA pinned to its memory-efficient (xFormers-derived cutlass) kernel."""

from torch.nn.attention import SDPBackend

from conformance.backend import Backend
from conformance.backends.requirements import cuda_reasons
from conformance.backends.sdpa import pinned
from conformance.capabilities import Capabilities

BACKEND = Backend(
    name="sdpa-efficient",
    fn=pinned(SDPBackend.EFFICIENT_ATTENTION),
    # GQA/MQA: "both fused kernels require query, key and value to have the same num_heads" (torch 2.11)
    capabilities=Capabilities(devices=frozenset({"cuda"}), dtypes=frozenset({"fp16", "bf16", "fp32"}),
                              head_dim_max=512, causal=("top_left", "bottom_right"), gqa=False, mqa=False,
                              memory="linear", attn_bias=True, bias_grad=True, dropout=True),
    description="torch SDPA pinned to SDPBackend.EFFICIENT_ATTENTION",
    unavailable_reasons=lambda: cuda_reasons(None, "SDPA's memory-efficient kernel"),
)
