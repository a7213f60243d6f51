"""Property-based fuzzing of the case space with hypothesis, within what a backend declares.

``cases(capabilities, device, needs)`` draws batch, seqlens (unequal too), heads and GQA/MQA ratios, head
dim, dtype, scale, causal alignment, layout (contiguous or strided views), magnitude, and the window,
softcap and ALiBi features a backend declares. A failure shrinks to a minimal case, whose id reruns it;
the driver (fuzz_driver.py) replays found failures first on the next run. A compiled backend's cases are
variants of its check's grid (``grid_variants``) with their sizes and values drawn: every variant it does
not share with the grid was a compilation of its own, run after run.
"""

from __future__ import annotations

import math

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from conformance import features, grid
from conformance.capabilities import Capabilities
from conformance.case import Case
from conformance.options import FUZZ_PROFILES as PROFILES  # --fuzz=NAME selects one (declared with the options)


EDGES = (1, 2, 16, 17, 63, 64, 65, 127, 128, 129, 160)
# Optional features a check does not need (window, softcap, ALiBi in the forward check) come in one draw
# of four each, so most draws test the check's own subject; features.py holds each feature's draw.
_sometimes = st.integers(0, 3).map(lambda x: x == 0)
_often = st.integers(0, 2).map(lambda x: x == 0)
# the KV cache's draw (features._draw_cache) draws these, the only feature they go with: their own rows would
# draw them again
_DRAWN_WITH_CACHE = ("paged_kv", "mixed_batch")


def profile(name: str) -> settings:
    # A narrow declaration legitimately filters out many draws.
    return settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
                    **PROFILES[name])


def not_fuzzable_reasons(caps: Capabilities, needs: tuple[str, ...], feature: str | None) -> list[str]:
    """Why no case at all can be drawn for a check: a feature it needs that the backend lacks."""
    required = (*needs, *([] if feature is None else [feature]))
    return [f"{name.replace('_', ' ')} not supported" for name in dict.fromkeys(required)
            if not (caps.causal if name == "causal" else getattr(caps, name))]


def grid_variants(check, caps: Capabilities, device: str, tier: str) -> tuple[Case, ...]:
    """One case of each variant (``scheduling.family``: dtype, head dim, layout, GQA or not, masked or not,
    scale, features and their kinds) that ``check``'s grid realises for ``caps`` at ``tier``: what a compiled
    backend's fuzz test draws its variants from (Backend.compiled). Each variant is a compilation of its
    own, and these the grid compiles anyway; empty where the grid realises none."""
    from conformance.scheduling import family

    if check.intents is None:  # no grid of intents (speed: its benchmarks)
        return ()
    realised = [r.case for r in grid.for_backend(check, caps, device, tier) if r.case is not None]
    return tuple({family(c): c for c in reversed(realised)}.values())[::-1]


def _as_variant(draw, variant: Case, fields: dict, max_seqlen: int) -> None:
    """The drawn sizes and feature values (``fields``) made those of ``variant``'s variant: its features, each
    drawn anew, with the bias's kind and pattern, the page size and a mixed batch or not as the variant has
    them (a draw that cannot keep them is rejected)."""
    from hypothesis import assume

    for f in features.FEATURES:
        if f.present(variant) and f.name not in _DRAWN_WITH_CACHE:
            f.draw(draw, fields, max_seqlen)
    if variant.attn_bias is not None:
        fields["attn_bias"] = variant.attn_bias
        if "b" in variant.attn_bias.partition(".")[2]:  # as _draw_attn_bias: a bias per batch item, over two
            fields["batch"] = 2
    if variant.cache_seqlens is not None:
        assume((fields.get("new_seqlens") is None) == (variant.new_seqlens is None))
        page = variant.page_block
        assume((fields.get("page_block") is None) == (page is None))
        if page is not None:
            fields.update(page_block=page, seqlen_k=max(2, -(-fields["seqlen_k"] // page)) * page)
    if variant.layout == "packed":  # q, k and v views of one tensor: one seqlen
        fields["seqlen_k"] = fields["seqlen_q"]


def _cache_in_multiple(fields: dict, multiple: int) -> None:
    """A KV-cache draw's lengths in the backend's seqlen multiple (its 1 to 8 new tokens are none of 16's,
    and every draw would be filtered out): the new tokens rounded as the grid rounds lengths, the cache grown
    by as many, up to whole multiples (and pages), so each item keeps its room. In a mixed batch the prefill
    adds them all, and the other items' caches grow by as many, so the decode's stays longer than the
    prefill's."""
    sq, news, grown = fields["seqlen_q"], fields.get("new_seqlens"), grid.round_length(fields["seqlen_q"], multiple)
    step = math.lcm(multiple, fields.get("page_block") or 1)
    fields.update(seqlen_q=grown, seqlen_k=-(-(fields["seqlen_k"] + grown - sq) // step) * step)
    if news is not None:
        fields.update(new_seqlens=tuple(grown if n == sq else n for n in news),
                      cache_seqlens=tuple(c if n == sq else c + grown - sq
                                          for c, n in zip(fields["cache_seqlens"], news)))


def cases(caps: Capabilities, device: str, needs: tuple[str, ...] = (), feature: str | None = None,
          max_seqlen: int = 160, variants: tuple[Case, ...] = ()) -> st.SearchStrategy:
    """Cases ``caps`` supports on ``device``, each with ``feature`` (a check's feature: "causal" or a
    name in features.FEATURES) if given, small enough to run by the hundred. ``variants``, when given (a
    compiled backend's: ``grid_variants``), are the only variants drawn: each case is one of theirs with its
    batch, seqlens, head counts, causal alignment, magnitude, feature values and seed drawn."""

    @st.composite
    def build(draw):
        variant = draw(st.sampled_from(variants)) if variants else None
        if variant is not None:
            head_dim = variant.head_dim
        elif caps.head_dims is not None:
            head_dim = draw(st.sampled_from(sorted(caps.head_dims)))
        else:
            head_dim = draw(st.integers(caps.head_dim_min, min(caps.head_dim_max, 160)))
        nheads_k = draw(st.integers(1, 2))
        if variant is not None:
            group = 1 if variant.nheads_k == variant.nheads else draw(st.sampled_from((2, 4)))
        else:
            group = draw(st.sampled_from((1, 1, 2, 4))) if caps.gqa or caps.mqa else 1
        m = caps.seqlen_multiple
        # block edges as often as anything else: bugs live one past a block, or at exactly one
        lengths = st.one_of(st.sampled_from([n for n in EDGES if n <= max_seqlen]), st.integers(1, max_seqlen)).map(
            lambda n: grid.round_length(n, m))
        fields = dict(batch=draw(st.integers(1, 2)), seqlen_q=draw(lengths))
        # unequal seqlens: 3 draws of 4
        fields["seqlen_k"] = fields["seqlen_q"] if caps.equal_seqlens or draw(_sometimes) else draw(lengths)
        # the check's own feature always; the other features the backend declares one draw in four each,
        # beside an attn_bias or dropout one in three (those checks' subject is the bias or the mask with
        # whatever else comes: a kernel may drop the bias where softcap, a window, ALiBi or dropout comes)
        others = _often if feature == "attn_bias" or "dropout" in needs else _sometimes
        if variant is not None:
            _as_variant(draw, variant, fields, max_seqlen)
        for f in features.FEATURES if variant is None else ():
            if f.name == feature or (feature in (None, "attn_bias") and f.name != feature and not f.own_call
                                     and getattr(caps, f.name) and draw(others)):
                f.draw(draw, fields, max_seqlen)
        if fields.get("cache_seqlens") is not None and m > 1:
            _cache_in_multiple(fields, m)
        own_call = feature in features.BY_NAME and features.BY_NAME[feature].own_call
        sq, sk = fields["seqlen_q"], fields["seqlen_k"]
        layouts = ["contiguous"] if own_call else ["contiguous", "bhsd"] + (["packed"] if sq == sk else [])
        alignments = caps.causal if feature != "kvcache" else tuple(a for a in caps.causal if a == "bottom_right")
        # a KV cache is read causally two draws in three (a serving engine's prefill is causal)
        causal = (alignments if feature == "causal" else
                  (None, *alignments, *alignments) if feature == "kvcache" else (None, *alignments))
        if variant is not None:  # masked or not as the variant is; the alignment is a number, not a variant
            causal = (None,) if variant.causal is None else (alignments or (variant.causal,))
        scale = st.none() | st.sampled_from((0.05, 0.1, 0.3, 0.5, 1.0, 2.0))
        return Case(
            nheads=nheads_k * group, nheads_k=nheads_k, head_dim=head_dim,
            dtype=variant.dtype if variant is not None else draw(st.sampled_from(sorted(caps.dtypes))),
            causal=draw(st.sampled_from(causal)),
            softmax_scale=(variant.softmax_scale if variant is not None else draw(scale)) if caps.softmax_scale else None,
            layout=variant.layout if variant is not None else draw(st.sampled_from(layouts)),
            magnitude=draw(st.sampled_from((1.0, 4.0, 16.0))), seed=draw(st.integers(0, 99_999)), **fields,
        )

    return build().filter(lambda case: not caps.not_supported_reasons(case, device, needs))
