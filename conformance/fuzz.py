"""Property-based fuzzing of the case space with hypothesis, within what a backend declares.

``cases(capabilities, device, needs)`` draws batch, seqlens (unequal too), heads and GQA/MQA ratios, head
dim, dtype, scale, causal alignment, layout (contiguous or strided views), magnitude, and the window,
softcap and ALiBi features a backend declares. A failure shrinks to a minimal case, whose id reruns it;
hypothesis' example database (``.hypothesis/``) replays found failures first on the next run.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from conformance.capabilities import Capabilities
from conformance.case import Case

# --fuzz=NAME selects one; they are registered as "conformance-NAME", leaving a project's own alone.
PROFILES = {
    "ci": {"max_examples": 20, "derandomize": True},  # the same examples every run: no flaky CI
    "dev": {"max_examples": 100},
    "thorough": {"max_examples": 1000},
}


def profile(name: str) -> settings:
    # A narrow declaration legitimately filters out many draws.
    return settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
                    **PROFILES[name])


def not_fuzzable_reasons(caps: Capabilities, needs: tuple[str, ...], causal_only: bool) -> list[str]:
    """Why no case at all can be drawn for a check (a feature it needs that the backend lacks)."""
    reasons = [f"{feature.replace('_', ' ')} not supported" for feature in needs if not getattr(caps, feature)]
    if causal_only and not caps.causal:
        reasons.append("causal masking not supported")
    return reasons


def cases(caps: Capabilities, device: str, needs: tuple[str, ...] = (), causal_only: bool = False,
          max_seqlen: int = 160) -> st.SearchStrategy:
    """Cases ``caps`` supports on ``device`` (causal ones only if asked), small enough to run by the hundred."""

    @st.composite
    def build(draw):
        if caps.head_dims is not None:
            head_dim = draw(st.sampled_from(sorted(caps.head_dims)))
        else:
            head_dim = draw(st.integers(caps.head_dim_min, min(caps.head_dim_max, 160)))
        nheads_k = draw(st.integers(1, 2))
        group = draw(st.sampled_from((1, 1, 2, 4))) if caps.gqa or caps.mqa else 1
        seqlen_q = draw(st.integers(1, max_seqlen))
        seqlen_k = seqlen_q if caps.equal_seqlens or draw(st.booleans()) else draw(st.integers(1, max_seqlen))
        layouts = ("contiguous", "bhsd", "packed") if seqlen_q == seqlen_k else ("contiguous", "bhsd")
        window = None
        if caps.window and draw(st.booleans()):
            window = (draw(st.integers(-1, max_seqlen)), draw(st.integers(-1, max_seqlen)))
        return Case(
            batch=draw(st.integers(1, 2)), seqlen_q=seqlen_q, seqlen_k=seqlen_k, nheads=nheads_k * group,
            nheads_k=nheads_k, head_dim=head_dim, dtype=draw(st.sampled_from(sorted(caps.dtypes))),
            causal=draw(st.sampled_from(caps.causal if causal_only else (None, *caps.causal))),
            softmax_scale=draw(st.none() | st.sampled_from((0.05, 0.1, 0.3, 0.5, 1.0, 2.0)))
            if caps.softmax_scale else None,
            layout=draw(st.sampled_from(layouts)), magnitude=draw(st.sampled_from((1.0, 4.0, 16.0))),
            window=window, softcap=draw(st.sampled_from((0.0, 5.0, 30.0))) if caps.softcap else 0.0,
            alibi=draw(st.booleans()) if caps.alibi else False, seed=draw(st.integers(0, 99_999)),
        )

    return build().filter(lambda case: not caps.not_supported_reasons(case, device, needs))
