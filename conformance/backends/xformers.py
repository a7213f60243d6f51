"""`xformers`: ``xformers.ops.memory_efficient_attention`` (its dispatcher picks an operator), with its
attention biases: ``LowerTriangularMask`` (top-left causal), ``LowerTriangularFromBottomRightMask``
(bottom-right), and ``BlockDiagonalMask`` / ``BlockDiagonalCausalMask`` for packed variable-length
batches. GQA/MQA go through xFormers' 5-d (batch, seqlen, groups, heads, head_dim) layout. An
``attn_bias`` tensor becomes xFormers' tensor bias: additive (a bool mask as 0 / -inf, the causal mask
folded in as -inf), expanded to (batch, heads, seqlen_q, seqlen_k) in a row-padded buffer (xFormers
wants its rows 16-byte aligned); its gradient is xFormers' to compute.

Availability asks xFormers itself: a wheel built for another torch imports with a warning and then has
no usable operator; the reasons are xFormers' own (its load error, and each operator's
``not_supported_reasons``, as ``python -m xformers.info`` would show).
"""

from __future__ import annotations

from conformance.backend import Backend, Unsupported
from conformance.backends import flash
from conformance.backends.requirements import cuda_reasons, import_reasons, package_reasons
from conformance.capabilities import Capabilities


def unavailable_reasons() -> list[str]:
    reasons = (package_reasons("xformers", "pip install xformers, built for your torch")
               or cuda_reasons(None, "xFormers' CUDA operators") or import_reasons("xformers.ops"))
    if reasons:
        return reasons
    import torch
    import xformers._cpp_lib
    from xformers.ops import fmha

    load_error = xformers._cpp_lib._cpp_library_load_exception
    if load_error is not None:
        reasons.append(" ".join(str(load_error).split()))
    tiny = torch.zeros(1, 8, 1, 64, device="cuda", dtype=torch.float16)
    try:
        fmha.memory_efficient_attention_forward(tiny, tiny, tiny)
    except NotImplementedError as exc:
        reasons.append(" ".join(str(exc).split()))
    return reasons


def _grouped(q, k, v):
    """(B, S, H, D) q with (B, S, Hk, D) k, v -> xFormers' (B, S, Hk, H/Hk, D) view, or as they are for MHA."""
    b, sq, h, d = q.shape
    hk = k.shape[2]
    if hk == h:
        return q, k, v
    group = h // hk
    expand = (lambda t: t.unsqueeze(3).expand(t.shape[0], t.shape[1], hk, group, d))
    return q.reshape(b, sq, hk, group, d), expand(k), expand(v)


def _efficient(*args, **kwargs):
    """memory_efficient_attention; "No operator found" (no xFormers operator takes this case) is the
    library refusing it, reported with xFormers' own per-operator reasons."""
    from xformers.ops import memory_efficient_attention

    try:
        return memory_efficient_attention(*args, **kwargs)
    except NotImplementedError as exc:
        if "No operator found" not in str(exc):
            raise
        reasons = [" ".join(line.split()) for line in str(exc).splitlines() if "is not supported because" in line
                   or line.startswith("    ")]
        raise Unsupported("xFormers has no operator for this case: " + " ".join(reasons)[:1500]) from None


def _tensor_bias(attn_bias, q, k, causal, causal_alignment):
    """The attn_bias as xFormers' additive tensor: (batch, heads, seqlen_q, seqlen_k), or 5-d
    (batch, kv heads, group, seqlen_q, seqlen_k) for GQA, its rows in a buffer padded to 16 elements."""
    import torch
    import torch.nn.functional as F

    b, sq, h, _ = q.shape
    sk, hk = k.shape[1], k.shape[2]
    bias = attn_bias.reshape((1,) * (4 - attn_bias.dim()) + tuple(attn_bias.shape))
    if bias.dtype == torch.bool:
        bias = torch.zeros(bias.shape, dtype=q.dtype, device=q.device).masked_fill(~bias, float("-inf"))
    bias = bias.to(q.dtype)
    if causal:
        offset = sk - sq if causal_alignment == "bottom_right" else 0
        bias = bias.masked_fill(~torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(offset), float("-inf"))
    bias = F.pad(bias.expand(b, h, sq, sk), (0, (-sk) % 16))[..., :sk]
    return bias if hk == h else bias.unflatten(1, (hk, h // hk))


def attention(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, causal_alignment="bottom_right",
              attn_bias=None):
    from xformers.ops import fmha

    bias = None
    if attn_bias is not None:
        bias = _tensor_bias(attn_bias, q, k, causal, causal_alignment)
    elif causal:
        bias = (fmha.attn_bias.LowerTriangularFromBottomRightMask() if causal_alignment == "bottom_right"
                else fmha.attn_bias.LowerTriangularMask())
    out = _efficient(*_grouped(q, k, v), attn_bias=bias, p=dropout_p, scale=softmax_scale)
    return out.reshape(q.shape)


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                     softmax_scale=None, causal=False):
    from xformers.ops import fmha

    lens_q, lens_k = cu_seqlens_q.diff().tolist(), cu_seqlens_k.diff().tolist()
    mask_type = fmha.attn_bias.BlockDiagonalCausalFromBottomRightMask if causal else fmha.attn_bias.BlockDiagonalMask
    bias = mask_type.from_seqlens(q_seqlen=lens_q, kv_seqlen=lens_k)
    out = _efficient(*_grouped(q[None], k[None], v[None]), attn_bias=bias, p=dropout_p, scale=softmax_scale)
    return out.reshape(q.shape)


# Where the flash-attn package is installed, xFormers' FA2 operator calls its kernels (xformers 0.0.35,
# xformers/ops/fmha/flash.py), and its dispatcher picks that operator for 16-bit inputs: with a flash-attn
# build that has kernels for some head dims only, the others crash the process (SIGSEGV, seen on the H100
# with a d64/d128 build). The declaration follows the build, as flash's does.
BACKEND = Backend(
    name="xformers",
    fn=attention,
    capabilities=Capabilities(devices=frozenset({"cuda"}), dtypes=frozenset({"fp16", "bf16", "fp32"}),
                              causal=("bottom_right", "top_left"), memory="linear", varlen=True,
                              attn_bias=True, bias_grad=True, dropout=True, **flash.installed_head_dims()),
    description="xformers.ops.memory_efficient_attention with its attention biases",
    unavailable_reasons=unavailable_reasons,
    varlen_fn=varlen_attention,
)
