"""The optional features of a case, declared once: one ``Feature`` row per feature.

A row says everything the suite needs to know about a feature except its formula (which stays in
``reference.py``, where the whole definition reads together) and the two declarations it keys: the
``Case`` field that holds it and the ``Capabilities`` flag of the same name. From the rows come the
case id's tokens, the validation of a case, the keyword arguments a backend is called with, the skip
reason of a backend without the feature, whether a case exercises a check's feature, and the fuzzer's
draws. ``tests/test_features.py`` holds the rows and the two declarations to each other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def _lengths(text: str) -> tuple[int, ...]:
    return tuple(int(n) for n in text.split("."))


def _dotted(values) -> str:
    return ".".join(map(str, values))


@dataclass(frozen=True)
class Feature:
    """name: the capability flag, a check's ``feature`` and what the fuzzer is asked for.
    field: the ``Case`` field; ``absent`` is its value in a case without the feature.
    token, encode, decode: the id token (``token + encode(value)``; ``decode`` reads the rest back).
    problems(case): why the feature's value cannot be (empty when it can), beside Case's own checks.
    kwargs(case, device): the flash-attn keyword arguments that ask for it ({} for a feature that has a
      function of its own, such as varlen's ``varlen_fn``).
    draw(draw, fields, max_seqlen): a fuzzed value, set in ``fields`` (the case being drawn; a feature
      with a call of its own also sets the shapes it needs).
    own_call: the feature is a calling convention of its own (contiguous layout, not combined with the
      other features); otherwise the fuzzer adds it to other checks' cases one draw in four.
    """

    name: str
    field: str
    absent: Any
    token: str
    encode: Callable[[Any], str]
    decode: Callable[[str], Any]
    kwargs: Callable[[Any, Any], dict]
    draw: Callable[..., None]
    problems: Callable[[Any], list[str]] = lambda case: []
    own_call: bool = False

    def present(self, case) -> bool:
        return getattr(case, self.field) != self.absent

    def id_token(self, case) -> str:
        return self.token + self.encode(getattr(case, self.field))


# -- draws (hypothesis strategies are imported by the fuzzer only) ------------------------------------

def _draw_window(draw, fields, max_seqlen):
    from hypothesis import strategies as st

    edge = st.one_of(st.integers(-1, 8), st.integers(-1, max_seqlen))  # narrow windows, where edges show
    window = (draw(edge), draw(edge))
    fields["window"] = (0, -1) if window == (-1, -1) else window


def _draw_softcap(draw, fields, max_seqlen):
    from hypothesis import strategies as st

    fields["softcap"] = draw(st.sampled_from((1.0, 5.0, 30.0)))


def _draw_alibi(draw, fields, max_seqlen):
    fields["alibi"] = True


def _draw_varlen(draw, fields, max_seqlen):
    from hypothesis import strategies as st

    varlen = tuple(draw(st.lists(st.integers(1, max_seqlen), min_size=1, max_size=4)))
    fields.update(varlen=varlen, batch=len(varlen), seqlen_q=max(varlen), seqlen_k=max(varlen))


def _draw_cache(draw, fields, max_seqlen):
    from hypothesis import strategies as st

    sq = draw(st.integers(1, 8))
    sk = draw(st.integers(sq, max_seqlen))
    cache = tuple(draw(st.lists(st.integers(0, sk - sq), min_size=fields["batch"], max_size=fields["batch"])))
    fields.update(seqlen_q=sq, seqlen_k=sk, cache_seqlens=cache)
    _draw_page(draw, fields, max_seqlen)  # the KV-cache check's cases are paged too, where declared
    _draw_mixed(draw, fields, max_seqlen)  # and mixed prefill and decode batches, where declared


def _draw_attn_bias(draw, fields, max_seqlen):
    from hypothesis import strategies as st

    # along the keys 3 draws in 4: a float bias constant over the keys is a constant shift, which the
    # softmax cancels, and a boolean one keeps or drops whole rows
    pattern = "".join(draw(st.sampled_from((c, "1") if c != "k" else ("k", "k", "k", "1"))) for c in "bhqk")
    fields["attn_bias"] = draw(st.sampled_from(BIAS_KINDS)) + "." + pattern
    if "b" in pattern:  # a bias per batch item over one item tests nothing of its broadcast
        fields["batch"] = 2


def _draw_page(draw, fields, max_seqlen):
    """A paged cache, one draw in two, for a KV-cache case (a no-op without cache_seqlens): block sizes of
    the usual kernels' sizes (16 to 128, and flash-attn's 256); the capacity rounded up to whole blocks, at
    least two per item (so that a table read in the wrong order shows)."""
    from hypothesis import strategies as st

    if fields.get("cache_seqlens") is None or not draw(st.booleans()):
        return
    page = draw(st.sampled_from((16, 32, 64, 128, 256)))
    fields.update(page_block=page, seqlen_k=max(2, -(-fields["seqlen_k"] // page)) * page)


def _draw_mixed(draw, fields, max_seqlen):
    """A mixed prefill and decode batch, one draw in three, for a KV-cache case with 2 or more new tokens (a
    no-op otherwise): 2 or 3 items, each with a cache length of its own, one adding seqlen_q new tokens
    (prefill), another 1 (decode) to a cache at least as long, a third any number between."""
    from hypothesis import strategies as st

    if fields.get("cache_seqlens") is None or fields["seqlen_q"] < 2 or draw(st.integers(0, 2)):
        return
    sq, sk, batch = fields["seqlen_q"], fields["seqlen_k"], draw(st.integers(2, 3))
    cache = draw(st.lists(st.integers(0, sk - 1), min_size=batch, max_size=batch))
    news = [draw(st.integers(1, min(sq, sk - n))) for n in cache]
    prefill = draw(st.integers(0, batch - 1))
    decode = (prefill + draw(st.integers(1, batch - 1))) % batch
    # a new request (a prefix shorter than drawn) beside a running one whose cache is longer than the prefill's
    cache[prefill] = draw(st.integers(0, min(cache[prefill], sk - sq)))
    cache[decode] = max(cache[decode], min(sk - 1, cache[prefill] + sq))
    news[prefill], news[decode] = sq, 1
    fields.update(batch=batch, cache_seqlens=tuple(cache), new_seqlens=tuple(news))


# -- keyword arguments ------------------------------------------------------------------------------

def _alibi_kwargs(case, device) -> dict:
    from conformance.inputs import alibi_slopes

    return {"alibi_slopes": alibi_slopes(case.nheads).to(device)}


# attn_bias: "<kind>.<pattern>". Kinds: "keep" (a boolean keep-mask, every query keeping a key), "rows" (a
# boolean keep-mask with fully masked rows), "add" (an additive float bias), "big" (an additive float bias
# of large magnitude: a per-row offset of 100 to 250 either sign, plus noise). The pattern says which of
# (batch, heads, seqlen_q, seqlen_k) the tensor spans, a "1" where it broadcasts: "b11k" is a key-padding
# mask (batch, 1, 1, seqlen_k), "1hqk" a per-head bias (1, nheads, seqlen_q, seqlen_k). The tensor itself
# is drawn from the case's seed (inputs.attn_bias).
BIAS_KINDS = ("keep", "rows", "add", "big")


def _attn_bias_kwargs(case, device) -> dict:
    from conformance.inputs import attn_bias

    return {"attn_bias": attn_bias(case, device)}


def _attn_bias_problems(case) -> list[str]:
    kind, _, pattern = case.attn_bias.partition(".")
    problems = []
    if kind not in BIAS_KINDS or len(pattern) != 4 or any(c not in (n, "1") for c, n in zip(pattern, "bhqk")):
        problems.append(f"attn_bias {case.attn_bias!r} is not <kind>.<pattern> with a kind of {BIAS_KINDS} and a "
                        "pattern of b|1, h|1, q|1, k|1")
    if case.varlen is not None or case.cache_seqlens is not None:
        problems.append("attn_bias does not combine with varlen or cache_seqlens")
    return problems


def _page_problems(case) -> list[str]:
    if case.cache_seqlens is None or case.page_block < 1 or case.seqlen_k % case.page_block:
        return ["page_block needs cache_seqlens and a cache capacity seqlen_k that is a multiple of it"]
    return []


def _mixed_problems(case) -> list[str]:
    n = case.new_seqlens
    if (case.cache_seqlens is None or len(n) != case.batch or min(n) < 1 or max(n) != case.seqlen_q
            or any(c + m > case.seqlen_k for c, m in zip(case.cache_seqlens, n))):
        return ["new_seqlens needs cache_seqlens and one count >= 1 per batch item, the most equal to seqlen_q, "
                "each fitting in the cache of seqlen_k after its cache_seqlens"]
    return []


def _varlen_problems(case) -> list[str]:
    lens = case.varlen
    if len(lens) != case.batch or min(lens) < 1 or max(lens) != case.seqlen_q or case.seqlen_q != case.seqlen_k:
        return ["varlen needs one length >= 1 per batch item, the longest equal to seqlen_q and seqlen_k"]
    return []


def _cache_problems(case) -> list[str]:
    n = case.cache_seqlens
    room = case.seqlen_q if case.new_seqlens is None else 1  # a mixed batch: each item's own count (mixed_batch)
    if len(n) != case.batch or min(n) < 0 or max(n) + room > case.seqlen_k:
        return ["cache_seqlens needs one count >= 0 per batch item, each leaving room for seqlen_q new tokens "
                "in a cache of seqlen_k"]
    return []


FEATURES: tuple[Feature, ...] = (
    Feature("window", "window", None, "win", encode=_dotted, decode=_lengths,
            kwargs=lambda case, device: {"window_size": case.window}, draw=_draw_window,
            problems=lambda case: [] if len(case.window) == 2 else ["window is (left, right)"]),
    Feature("softcap", "softcap", 0.0, "cap", encode=lambda v: f"{v:g}", decode=float,
            kwargs=lambda case, device: {"softcap": case.softcap}, draw=_draw_softcap,
            problems=lambda case: [] if case.softcap > 0 else ["softcap must be >= 0"]),
    Feature("alibi", "alibi", False, "alibi", encode=lambda v: "", decode=lambda text: True,
            kwargs=_alibi_kwargs, draw=_draw_alibi),
    Feature("varlen", "varlen", None, "varlen", encode=_dotted, decode=_lengths,
            kwargs=lambda case, device: {}, draw=_draw_varlen, problems=_varlen_problems, own_call=True),
    Feature("kvcache", "cache_seqlens", None, "cache", encode=_dotted, decode=_lengths,
            kwargs=lambda case, device: {}, draw=_draw_cache, problems=_cache_problems, own_call=True),
    Feature("attn_bias", "attn_bias", None, "bias", encode=str, decode=str, kwargs=_attn_bias_kwargs,
            draw=_draw_attn_bias, problems=_attn_bias_problems),
    # a paged KV cache (flash-attn's block_table): a kvcache case's caches as blocks of page_block tokens;
    # the kvcache check builds the table and passes block_table (capability paged_kv, page_block_multiple)
    Feature("paged_kv", "page_block", None, "page", encode=str, decode=int, kwargs=lambda case, device: {},
            draw=_draw_page, problems=_page_problems),
    # a mixed prefill and decode batch: a kvcache case whose items add different numbers of new tokens; the
    # kvcache check writes them into the (paged) cache and calls varlen_fn with per-sequence query and key
    # lengths, flash_attn_varlen_func's convention (block_table= for a paged cache)
    Feature("mixed_batch", "new_seqlens", None, "new", encode=_dotted, decode=_lengths,
            kwargs=lambda case, device: {}, draw=_draw_mixed, problems=_mixed_problems),
)
BY_NAME = {f.name: f for f in FEATURES}


def present(case) -> list[Feature]:
    """The features ``case`` uses."""
    return [f for f in FEATURES if f.present(case)]


def read_token(token: str) -> tuple[str, Any] | None:
    """(field, value) for a feature's id token, or None when it is none of theirs; the longest
    matching prefix wins. A ValueError when the prefix matches but the rest does not read."""
    for f in sorted(FEATURES, key=lambda f: -len(f.token)):
        rest = token[len(f.token):]
        if token.startswith(f.token) and (rest == "") == (f.absent is False):  # a flag's token is bare
            return f.field, f.decode(rest)
    return None
