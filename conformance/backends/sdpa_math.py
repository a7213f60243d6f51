"""`sdpa-math`: torch's scaled_dot_product_attention pinned to its math backend.

SDPA takes (batch, heads, seqlen, head_dim); this adapter transposes. ``is_causal`` is top-left
aligned; bottom-right alignment goes through ``torch.nn.attention.bias.causal_lower_right``. The math
backend returns zeros for a query that may attend to no key (its safe softmax, torch >= 2.5).
"""

from __future__ import annotations

import warnings

import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from conformance.backend import Backend
from conformance.capabilities import Capabilities


def attention(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, causal_alignment="top_left"):
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    mask, is_causal = None, False
    if causal and causal_alignment == "bottom_right" and q.shape[-2] != k.shape[-2]:
        with warnings.catch_warnings():  # it warns of NaN rows, which the math backend's safe softmax avoids
            warnings.filterwarnings("ignore", "Lower right causal bias will produce NaNs")
            mask = causal_lower_right(q.shape[-2], k.shape[-2])
    else:
        is_causal = causal
    with sdpa_kernel(SDPBackend.MATH):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
                                             scale=softmax_scale, enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(1, 2)


BACKEND = Backend(
    name="sdpa-math",
    fn=attention,
    capabilities=Capabilities(causal=("top_left", "bottom_right"), head_dim_max=1024, memory="quadratic"),
    description="torch SDPA pinned to SDPBackend.MATH",
)
