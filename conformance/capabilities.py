"""What a backend declares it supports, as data, and the readable reasons a case falls outside it.

Capabilities are declared, never guessed from tensors: the plugin checks every case against them at
collection time, and the same reasons feed skip messages, ``--list-backends`` and errors. A case
outside the declaration is skipped with those reasons; a case inside it that errors or disagrees fails.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from conformance import features
from conformance.case import ALIGNMENTS, DTYPES, Case
from conformance.reference import MASKED_ROW_CONVENTIONS, fully_masked_rows

MEMORY_CLASSES = ("linear", "quadratic", "unknown")
_COUNTS = ("head_dim_min", "head_dim_max", "head_dim_multiple", "seqlen_multiple",
           "page_block_multiple")  # whole numbers >= 1
ACCUMULATIONS = ("fp32", "input")


@dataclass(frozen=True)
class Capabilities:
    """Defaults describe flash-attn's ``flash_attn_func``; each field is documented in the README."""

    devices: frozenset[str] = frozenset({"cpu", "cuda"})
    dtypes: frozenset[str] = frozenset(DTYPES)
    head_dim_min: int = 1
    head_dim_max: int = 256
    head_dims: frozenset[int] | None = None  # the exact set, where a build has kernels for only some
    head_dim_multiple: int = 1
    causal: tuple[str, ...] = ("bottom_right",)  # alignments; the first is what causal=True means
    masked_rows: str = "zeros"  # what a query that may attend to no key returns
    gqa: bool = True
    mqa: bool = True
    backward: bool = True
    softmax_scale: bool = True
    noncontiguous: bool = True
    seqlen_multiple: int = 1
    max_seqlen: int | None = None
    equal_seqlens: bool = False  # seqlen_q == seqlen_k only
    memory: str = "unknown"  # "linear" | "quadratic" | "unknown"
    # one flag per case feature (features.FEATURES), named as the feature
    window: bool = False
    softcap: bool = False
    alibi: bool = False
    varlen: bool = False
    kvcache: bool = False
    dropout: bool = False
    attn_bias: bool = False  # an attn_bias tensor: bool keep-mask or additive float, broadcast over batch/heads
    bias_grad: bool = False  # the gradient reaches a float attn_bias that requires grad
    paged_kv: bool = False  # KV-cache decoding from a paged cache (kvcache_fn takes block_table)
    page_block_multiple: int = 1  # the paged cache's block size must be a multiple of this
    # a mixed prefill and decode batch: varlen_fn takes per-sequence query and key lengths (cu_seqlens_q !=
    # cu_seqlens_k) over a KV cache, and block_table for a paged one where paged_kv is declared
    mixed_batch: bool = False
    # For fp16/bf16 inputs, what the kernel accumulates softmax and P·V in: "fp32" as FlashAttention
    # kernels do (the tolerance's yardstick is then a float32 computation from the rounded inputs), or
    # "input" as plain PyTorch in the input dtype (the yardstick is that computation). See tolerance.py.
    accumulation: str = "fp32"
    deterministic_forward: bool = True
    deterministic_backward: bool = False

    def __post_init__(self):
        problems = []
        if not set(self.dtypes) <= set(DTYPES):
            problems.append(f"dtypes must be among {sorted(DTYPES)}")
        if not set(self.causal) <= set(ALIGNMENTS):
            problems.append(f"causal alignments must be among {ALIGNMENTS}")
        if self.masked_rows not in MASKED_ROW_CONVENTIONS:
            problems.append(f"masked_rows must be one of {MASKED_ROW_CONVENTIONS}")
        if self.accumulation not in ACCUMULATIONS:
            problems.append(f"accumulation must be one of {ACCUMULATIONS}")
        if self.memory not in MEMORY_CLASSES:
            problems.append(f"memory must be one of {MEMORY_CLASSES}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "bool" and not isinstance(value, bool):
                problems.append(f"{f.name} must be true or false, not {value!r}")
            elif f.name in _COUNTS and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                problems.append(f"{f.name} must be a whole number >= 1, not {value!r}")
        if self.max_seqlen is not None and not (isinstance(self.max_seqlen, int) and self.max_seqlen >= 1):
            problems.append(f"max_seqlen must be a whole number >= 1 or null, not {self.max_seqlen!r}")
        if self.head_dims is not None and not all(isinstance(d, int) and d >= 1 for d in self.head_dims):
            problems.append(f"head_dims must be whole numbers >= 1, not {sorted(self.head_dims, key=str)!r}")
        if not set(self.devices) <= {"cpu", "cuda"}:
            problems.append(f"devices must be among ['cpu', 'cuda'], not {sorted(self.devices, key=str)!r}")
        if not problems and self.head_dim_min > self.head_dim_max:
            problems.append("head_dim_min is above head_dim_max")
        if problems:
            raise ValueError("invalid capabilities: " + "; ".join(problems))

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def updated(self, changes: dict) -> Capabilities:
        """These capabilities narrowed or widened by a dict (a user's ``conformance_capabilities``)."""
        unknown = sorted(set(changes) - set(self.keys()))
        if unknown:
            raise ValueError(f"unknown capability keys {unknown}; known keys: {', '.join(self.keys())}")
        coerced = {}
        for key, value in changes.items():
            if key in ("devices", "dtypes") or (key == "head_dims" and value is not None):
                value = frozenset([value] if isinstance(value, (str, int)) else value)
            elif key == "causal":
                value = (value,) if isinstance(value, str) else tuple(value or ())
            coerced[key] = value
        return dataclasses.replace(self, **coerced)

    def supports_head_dim(self, d: int) -> bool:
        if self.head_dims is not None:
            return d in self.head_dims
        return self.head_dim_min <= d <= self.head_dim_max and d % self.head_dim_multiple == 0

    def head_dim_text(self) -> str:
        if self.head_dims is not None:
            runs: list[list[int]] = []
            for d in sorted(self.head_dims):
                if runs and d == runs[-1][1] + 1:
                    runs[-1][1] = d
                else:
                    runs.append([d, d])
            return "{" + ", ".join(f"{a}-{b}" if b > a else str(a) for a, b in runs) + "}"
        multiple = f" (multiples of {self.head_dim_multiple})" if self.head_dim_multiple > 1 else ""
        return f"{self.head_dim_min}-{self.head_dim_max}{multiple}"

    def not_supported_reasons(self, case: Case, device: str, needs: tuple[str, ...] = ()) -> list[str]:
        """Why this backend cannot run ``case`` on ``device``; empty when it can. ``needs`` names
        features a check requires beyond the case itself (e.g. "backward")."""
        reasons = []
        if device not in self.devices:
            reasons.append(f"device {device} not supported (declared: {', '.join(sorted(self.devices))})")
        if case.dtype not in self.dtypes:
            reasons.append(f"dtype {case.dtype} not supported (declared: {', '.join(sorted(self.dtypes))})")
        if not self.supports_head_dim(case.head_dim):
            reasons.append(f"head dim {case.head_dim} not supported (declared: {self.head_dim_text()})")
        if case.causal is not None:
            if not self.causal:
                reasons.append("causal masking not supported")
            elif case.causal not in self.causal and case.seqlen_q != case.seqlen_k:
                reasons.append(f"causal alignment {case.causal} not supported (declared: {', '.join(self.causal)})")
        if case.nheads != case.nheads_k:
            kind = "mqa" if case.nheads_k == 1 else "gqa"
            if not getattr(self, kind):
                reasons.append(f"{kind.upper()} (nheads {case.nheads}, nheads_k {case.nheads_k}) not supported")
        if case.softmax_scale is not None and not self.softmax_scale:
            reasons.append("custom softmax_scale not supported")
        if case.layout != "contiguous" and not self.noncontiguous:
            reasons.append(f"non-contiguous inputs ({case.layout}) not supported")
        for seqlen in {case.seqlen_q, case.seqlen_k}:
            if seqlen % self.seqlen_multiple:
                reasons.append(f"seqlen {seqlen} is not a multiple of {self.seqlen_multiple}")
            if self.max_seqlen is not None and seqlen > self.max_seqlen:
                reasons.append(f"seqlen {seqlen} above the maximum {self.max_seqlen}")
        if self.equal_seqlens and case.seqlen_q != case.seqlen_k:
            reasons.append("only seqlen_q == seqlen_k is supported")
        for feature in features.present(case):
            if not getattr(self, feature.name):
                reasons.append(f"{feature.name} not supported")
        if case.page_block is not None and self.paged_kv and case.page_block % self.page_block_multiple:
            reasons.append(f"paged KV block size {case.page_block} is not a multiple of {self.page_block_multiple}")
        for feature in needs:
            if not getattr(self, feature):
                reasons.append(f"{feature.replace('_', ' ')} not supported")
        if "backward" in needs and self.masked_rows == "nan" and fully_masked_rows(case) is not None:
            reasons.append("gradients are undefined: fully masked rows return NaN by declaration")
        return reasons

    def summary(self) -> str:
        """One line for --list-backends."""
        feats = [f for f in ("gqa", "mqa", "backward", *features.BY_NAME, "bias_grad", "dropout",
                             "deterministic_backward")
                 if getattr(self, f)]
        causal = "/".join(self.causal) if self.causal else "none"
        return (f"devices {','.join(sorted(self.devices))}; dtypes {','.join(sorted(self.dtypes))}; "
                f"head dims {self.head_dim_text()}; causal {causal}; masked rows -> {self.masked_rows}; "
                f"memory {self.memory}; "
                + (f"accumulates in the input dtype; " if self.accumulation == "input" else "")
                + " ".join(feats))
