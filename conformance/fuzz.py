"""Property-based fuzzing of the case space with hypothesis, within what a backend declares.

``cases(capabilities, device, needs)`` draws batch, seqlens (unequal too), heads and GQA/MQA ratios, head
dim, dtype, scale, causal alignment, layout (contiguous or strided views), magnitude, and the window,
softcap and ALiBi features a backend declares. A failure shrinks to a minimal case, whose id reruns it;
hypothesis' example database (``.hypothesis/``) replays found failures first on the next run.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from conformance import grid
from conformance.capabilities import Capabilities
from conformance.case import Case
from conformance.options import FUZZ_PROFILES as PROFILES  # --fuzz=NAME selects one (declared with the options)


EDGES = (1, 2, 16, 17, 63, 64, 65, 127, 128, 129, 160)
# Optional features a check does not need (window, softcap, ALiBi in the forward check) come in one draw
# of four each, so most draws test the check's own subject.
_sometimes = st.integers(0, 3).map(lambda x: x == 0)


def profile(name: str) -> settings:
    # A narrow declaration legitimately filters out many draws.
    return settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
                    **PROFILES[name])


def not_fuzzable_reasons(caps: Capabilities, needs: tuple[str, ...], feature: str | None) -> list[str]:
    """Why no case at all can be drawn for a check: a feature it needs that the backend lacks."""
    required = (*needs, *([] if feature is None else [feature]))
    return [f"{name.replace('_', ' ')} not supported" for name in dict.fromkeys(required)
            if not (caps.causal if name == "causal" else getattr(caps, name))]


def cases(caps: Capabilities, device: str, needs: tuple[str, ...] = (), feature: str | None = None,
          max_seqlen: int = 160) -> st.SearchStrategy:
    """Cases ``caps`` supports on ``device``, each with ``feature`` (a check's CASE_FEATURE: "causal",
    "window", "softcap", "alibi", "varlen", "kvcache") if given, small enough to run by the hundred."""

    @st.composite
    def build(draw):
        if caps.head_dims is not None:
            head_dim = draw(st.sampled_from(sorted(caps.head_dims)))
        else:
            head_dim = draw(st.integers(caps.head_dim_min, min(caps.head_dim_max, 160)))
        nheads_k = draw(st.integers(1, 2))
        group = draw(st.sampled_from((1, 1, 2, 4))) if caps.gqa or caps.mqa else 1
        batch = draw(st.integers(1, 2))
        m = caps.seqlen_multiple
        # block edges as often as anything else: bugs live one past a block, or at exactly one
        lengths = st.one_of(st.sampled_from([n for n in EDGES if n <= max_seqlen]), st.integers(1, max_seqlen)).map(
            lambda n: grid.round_length(n, m))
        seqlen_q = draw(lengths)
        seqlen_k = seqlen_q if caps.equal_seqlens or draw(_sometimes) else draw(lengths)  # unequal: 3 draws of 4
        varlen = cache_seqlens = None
        if feature == "varlen":
            varlen = tuple(draw(st.lists(st.integers(1, max_seqlen), min_size=1, max_size=4)))
            batch, seqlen_q, seqlen_k = len(varlen), max(varlen), max(varlen)
        if feature == "kvcache":
            seqlen_q = draw(st.integers(1, 8))
            seqlen_k = draw(st.integers(seqlen_q, max_seqlen))
            cache_seqlens = tuple(draw(st.lists(st.integers(0, seqlen_k - seqlen_q), min_size=batch, max_size=batch)))
        layouts = ["contiguous", "bhsd"] + (["packed"] if seqlen_q == seqlen_k else [])
        if feature in ("varlen", "kvcache"):
            layouts = ["contiguous"]
        alignments = caps.causal if feature != "kvcache" else tuple(a for a in caps.causal if a == "bottom_right")
        causal = draw(st.sampled_from(alignments if feature == "causal" else (None, *alignments)))
        window = None
        if feature == "window" or (caps.window and feature is None and draw(_sometimes)):
            edge = st.one_of(st.integers(-1, 8), st.integers(-1, max_seqlen))  # narrow windows, where edges show
            window = (draw(edge), draw(edge))
            if window == (-1, -1):
                window = (0, -1)
        softcap = 0.0
        if feature == "softcap" or (caps.softcap and feature is None and draw(_sometimes)):
            softcap = draw(st.sampled_from((1.0, 5.0, 30.0)))
        alibi = feature == "alibi" or (caps.alibi and feature is None and draw(_sometimes))
        return Case(
            batch=batch, seqlen_q=seqlen_q, seqlen_k=seqlen_k, nheads=nheads_k * group, nheads_k=nheads_k,
            head_dim=head_dim, dtype=draw(st.sampled_from(sorted(caps.dtypes))), causal=causal,
            softmax_scale=draw(st.none() | st.sampled_from((0.05, 0.1, 0.3, 0.5, 1.0, 2.0)))
            if caps.softmax_scale else None,
            layout=draw(st.sampled_from(layouts)), magnitude=draw(st.sampled_from((1.0, 4.0, 16.0))),
            window=window, softcap=softcap, alibi=alibi, varlen=varlen, cache_seqlens=cache_seqlens,
            seed=draw(st.integers(0, 99_999)),
        )

    return build().filter(lambda case: not caps.not_supported_reasons(case, device, needs))
