"""`sdpa-math`: torch SDPA pinned to its math backend (any device, any float dtype; it materialises the
score matrix). It returns zeros for a query that may attend to no key (its safe softmax, torch >= 2.5).
KV-cache decoding (contiguous or paged, mixed prefill and decode batches too) and packed variable-length
batches call it per batch item, bottom-right."""

from torch.nn.attention import SDPBackend

from conformance.backend import Backend
from conformance.backends.kvcache_adapter import kvcache_with, varlen_with
from conformance.backends.sdpa import pinned
from conformance.capabilities import Capabilities

_MATH = pinned(SDPBackend.MATH)

BACKEND = Backend(
    name="sdpa-math",
    fn=_MATH,
    capabilities=Capabilities(causal=("top_left", "bottom_right"), head_dim_max=1024, memory="quadratic",
                              attn_bias=True, bias_grad=True, varlen=True, kvcache=True, paged_kv=True,
                              mixed_batch=True,
                              dropout=True),
    description="torch SDPA pinned to SDPBackend.MATH",
    varlen_fn=varlen_with(_MATH, causal_alignment="bottom_right"),
    kvcache_fn=kvcache_with(_MATH, causal_alignment="bottom_right"),
)
