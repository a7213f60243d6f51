"""One attention problem, as plain data: shapes, dtype, masking, layout, seed.

A case never holds tensors. Its id is a complete serialisation (``Case.from_id(case.id) == case``),
so a failing case can be rerun from the one line printed with it, and results and baselines are keyed
by something that does not change when a test function is renamed.
"""

from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass

import torch

from conformance import features

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}
ALIGNMENTS = ("bottom_right", "top_left")
LAYOUTS = ("contiguous", "packed", "bhsd")
_ALIGN_TOKENS = {"bottom_right": "br", "top_left": "tl"}


@dataclass(frozen=True)
class Case:
    """q is (batch, seqlen_q, nheads, head_dim); k and v are (batch, seqlen_k, nheads_k, head_dim).

    causal: None, or the alignment of the causal mask ("bottom_right" as in flash-attn: query i sees
      keys j <= i + seqlen_k - seqlen_q; "top_left" as in SDPA's is_causal: keys j <= i).
    softmax_scale: None means 1/sqrt(head_dim), and the backend is called without the argument.
    layout: "contiguous"; "packed" (q, k, v are views into one (batch, seqlen, nheads + 2*nheads_k,
      head_dim) tensor, so seqlen_q == seqlen_k); "bhsd" (transposed views of (batch, heads, seqlen,
      head_dim) storage). The last two are non-contiguous.
    magnitude: standard deviation of q and k; 16 puts logits far above 88, where an exp without
      max-subtraction overflows in float32.
    The optional features (window ... cache_seqlens) are declared in features.py: their id tokens,
    keywords, checks and draws.
    window: (left, right) sliding window as in flash-attn's window_size, -1 meaning unbounded.
    softcap: 0 for none, else scores become softcap * tanh(scores / softcap).
    alibi: add ALiBi biases -slope_h * |i + seqlen_k - seqlen_q - j| with the standard slopes.
    varlen: the lengths of the sequences of a packed variable-length batch (one per batch item; q and k
      of a sequence have the same length; seqlen_q == seqlen_k == the longest).
    cache_seqlens: KV-cache decoding: tokens already in each batch item's cache, whose capacity is
      seqlen_k; the seqlen_q new tokens are appended after them and attend to cache and themselves.
    attn_bias: an attention mask or additive bias, "<kind>.<pattern>" (features.BIAS_KINDS), passed as
      one tensor broadcastable to (batch, nheads, seqlen_q, seqlen_k): bool keeps where True, float is
      added to the scaled scores, as SDPA's attn_mask.
    page_block: with cache_seqlens, a paged KV cache (flash-attn's block_table): the caches are blocks of
      this many tokens, each batch item's seqlen_k / page_block blocks found through a permuted table.
    new_seqlens: with cache_seqlens, a mixed prefill and decode batch: batch item b adds new_seqlens[b]
      tokens (1 for a decode row, more for a prefill row; the most is seqlen_q) after its cache_seqlens[b],
      and its new_seqlens[b] queries attend to them and its cache (flash_attn_varlen_func with per-sequence
      query and key lengths, and block_table for a paged cache).
    """

    batch: int = 2
    seqlen_q: int = 128
    seqlen_k: int = 128
    nheads: int = 4
    nheads_k: int | None = None  # None: same as nheads
    head_dim: int = 64
    dtype: str = "fp32"
    causal: str | None = None
    softmax_scale: float | None = None
    layout: str = "contiguous"
    magnitude: float = 1.0
    window: tuple[int, int] | None = None
    softcap: float = 0.0
    alibi: bool = False
    varlen: tuple[int, ...] | None = None
    cache_seqlens: tuple[int, ...] | None = None
    attn_bias: str | None = None
    page_block: int | None = None
    new_seqlens: tuple[int, ...] | None = None
    seed: int = 0

    def __post_init__(self):
        if self.nheads_k is None:
            object.__setattr__(self, "nheads_k", self.nheads)
        problems = []
        if min(self.batch, self.seqlen_q, self.seqlen_k, self.nheads, self.nheads_k, self.head_dim) < 1:
            problems.append("batch, seqlens, heads and head_dim must be >= 1")
        if self.nheads % self.nheads_k:
            problems.append(f"nheads {self.nheads} is not a multiple of nheads_k {self.nheads_k}")
        if self.dtype not in DTYPES:
            problems.append(f"dtype {self.dtype!r} is not one of {sorted(DTYPES)}")
        if self.causal not in (None, *ALIGNMENTS):
            problems.append(f"causal {self.causal!r} is not None or one of {ALIGNMENTS}")
        if self.layout not in LAYOUTS:
            problems.append(f"layout {self.layout!r} is not one of {LAYOUTS}")
        if self.layout == "packed" and self.seqlen_q != self.seqlen_k:
            problems.append("layout 'packed' needs seqlen_q == seqlen_k")
        if self.softmax_scale is not None and not self.softmax_scale > 0:
            problems.append("softmax_scale must be > 0")
        if self.magnitude <= 0:
            problems.append("magnitude must be > 0")
        used = features.present(self)
        for feature in used:
            problems += feature.problems(self)
        own_calls = [f.name for f in used if f.own_call]
        if len(own_calls) > 1:
            problems.append(f"{' and '.join(own_calls)} do not combine")
        if problems:
            raise ValueError("invalid case: " + "; ".join(problems))

    # -- derived properties -------------------------------------------------------------------
    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def scale(self) -> float:
        return self.softmax_scale if self.softmax_scale is not None else self.head_dim**-0.5

    def replace(self, **changes) -> Case:
        return dataclasses.replace(self, **changes)

    # -- id round trip ------------------------------------------------------------------------
    @property
    def id(self) -> str:
        parts = [f"b{self.batch}", f"q{self.seqlen_q}", f"k{self.seqlen_k}", f"h{self.nheads}"]
        if self.nheads_k != self.nheads:
            parts.append(f"kv{self.nheads_k}")
        parts += [f"d{self.head_dim}", self.dtype]
        if self.causal:
            parts.append("causal" + _ALIGN_TOKENS[self.causal])
        if self.softmax_scale is not None:
            parts.append(f"scale{self.softmax_scale:g}")
        if self.layout != "contiguous":
            parts.append(self.layout)
        if self.magnitude != 1.0:
            parts.append(f"x{self.magnitude:g}")
        parts += [f.id_token(self) for f in features.present(self)]
        parts.append(f"seed{self.seed}")
        return "_".join(parts)

    @classmethod
    def from_id(cls, case_id: str) -> Case:
        """Parse an id made by ``Case.id``; a ValueError names the token it cannot read."""
        fields: dict = {}
        aligns = {v: k for k, v in _ALIGN_TOKENS.items()}
        ints = {"b": "batch", "q": "seqlen_q", "k": "seqlen_k", "h": "nheads", "kv": "nheads_k",
                "d": "head_dim", "seed": "seed"}
        for token in case_id.split("_"):
            try:
                if token in DTYPES:
                    fields["dtype"] = token
                elif token.startswith("causal") and token[6:] in aligns:
                    fields["causal"] = aligns[token[6:]]
                elif token.startswith("scale"):
                    fields["softmax_scale"] = float(token[5:])
                elif token in LAYOUTS:
                    fields["layout"] = token
                elif (feature := features.read_token(token)) is not None:
                    fields[feature[0]] = feature[1]
                elif token.startswith("x"):
                    fields["magnitude"] = float(token[1:])
                else:
                    prefix = token.rstrip("0123456789")
                    fields[ints[prefix]] = int(token[len(prefix):])
            except (KeyError, ValueError):
                raise ValueError(f"cannot read token {token!r} of case id {case_id!r}") from None
        return cls(**fields)

    @property
    def bias_kind(self) -> str | None:
        return None if self.attn_bias is None else self.attn_bias.split(".")[0]

    @property
    def bias_shape(self) -> tuple[int, int, int, int] | None:
        """The shape of the attn_bias tensor: (batch or 1, nheads or 1, seqlen_q or 1, seqlen_k or 1)."""
        if self.attn_bias is None:
            return None
        full = (self.batch, self.nheads, self.seqlen_q, self.seqlen_k)
        return tuple(n if c != "1" else 1 for n, c in zip(full, self.attn_bias.split(".")[1]))

    def seeded(self) -> Case:
        """The same case with a seed derived from its other fields (stable across runs and machines)."""
        return self.replace(seed=zlib.crc32(self.replace(seed=0).id.encode()) % 100_000)
