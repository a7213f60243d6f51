"""`sdpa-math`: torch SDPA pinned to its math backend (any device, any float dtype; it materialises the
score matrix). It returns zeros for a query that may attend to no key (its safe softmax, torch >= 2.5)."""

from torch.nn.attention import SDPBackend

from conformance.backend import Backend
from conformance.backends.sdpa import pinned
from conformance.capabilities import Capabilities

BACKEND = Backend(
    name="sdpa-math",
    fn=pinned(SDPBackend.MATH),
    capabilities=Capabilities(causal=("top_left", "bottom_right"), head_dim_max=1024, memory="quadratic",
                              attn_bias=True, bias_grad=True),
    description="torch SDPA pinned to SDPBackend.MATH",
)
