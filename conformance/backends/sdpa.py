"""The adapter shared by the SDPA backends: torch's scaled_dot_product_attention pinned to one kernel
with ``torch.nn.attention.sdpa_kernel``, so a silent fallback to another kernel is impossible.

SDPA takes (batch, heads, seqlen, head_dim); the adapter transposes. ``is_causal`` is top-left aligned;
bottom-right alignment goes through ``torch.nn.attention.bias.causal_lower_right``. When the pinned
kernel cannot run a case, torch raises "No available kernel" (CUDA) or "No viable backend" (CPU)
after warning why; the adapter raises
``Unsupported`` with torch's own warnings as the reason, so the case is skipped, never passed.
``attn_bias`` is passed as ``attn_mask``; with causal as well (SDPA takes one or the other), the causal
mask is folded into it: a bool mask and-ed, a float bias set to -inf where the causal mask hides.
"""

from __future__ import annotations

import re
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from conformance.backend import Unsupported

REFUSALS = ("No available kernel", "No viable backend")  # what torch raises when the pinned kernel can't run


def _reasons(caught, exc) -> str:
    """torch's warnings, without their "(Triggered internally at ...)" boilerplate and bare headers."""
    texts = []
    for warning in caught:
        text = re.sub(r"\s*\(Triggered internally at [^)]*\)\s*", " ", str(warning.message)).strip()
        if text and not re.fullmatch(r"[\w\s-]*kernel not used because:", text) and text not in texts:
            texts.append(text)
    return " | ".join(texts) or f"{exc} (torch gives its detailed reasons once per process)"


def pinned(kernel: SDPBackend, default_alignment: str = "top_left"):
    """An attention function in flash-attn's convention that runs SDPA on ``kernel`` only.
    ``default_alignment`` is what causal=True means without a ``causal_alignment`` argument."""

    def attention(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, causal_alignment=default_alignment,
                  attn_bias=None):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        mask, is_causal = None, False
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if attn_bias is not None:
                mask = attn_bias
                if causal:
                    sq, sk = q.shape[-2], k.shape[-2]
                    offset = sk - sq if causal_alignment == "bottom_right" else 0
                    keep = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(offset)
                    mask = mask & keep if mask.dtype == torch.bool else mask.masked_fill(~keep, float("-inf"))
            elif causal and causal_alignment == "bottom_right" and q.shape[-2] != k.shape[-2]:
                mask = causal_lower_right(q.shape[-2], k.shape[-2])
            else:
                is_causal = causal
            try:
                with sdpa_kernel([kernel]):
                    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                                         is_causal=is_causal, scale=softmax_scale,
                                                         enable_gqa=q.shape[1] != k.shape[1])
            except RuntimeError as exc:
                if not any(text in str(exc) for text in REFUSALS):
                    raise
                raise Unsupported(f"torch refused {kernel.name}: {_reasons(caught, exc)}") from None
        return out.transpose(1, 2)

    attention.__name__ = f"sdpa_{kernel.name.lower()}"
    return attention
