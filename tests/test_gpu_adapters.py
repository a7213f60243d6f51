"""The GPU backends' argument translation, checked on the CPU where it is non-trivial; and their
availability reasons on a machine without a GPU."""

import dataclasses
import functools

import pytest
import torch
from torch.nn.attention import SDPBackend
from torch.nn.attention.flex_attention import flex_attention

from conformance import kernel_side, reference
from conformance.backend import Unsupported, call
from conformance.backends import flash, flex, xformers
from conformance.backends.sdpa import pinned
from conformance.case import Case
from conformance.inputs import make_inputs

# What flex._no_eager_fallback sets in dynamo's config, which is the whole pytest process's: a test that
# compiles through the adapter restores them (each of the flag's names this torch has: newer torch keeps
# the old name as an alias).
DYNAMO_SETTINGS = tuple(name for name in ("cache_size_limit", "accumulated_cache_size_limit",
                                          "fail_on_recompile_limit_hit", "fail_on_cache_limit_hit")
                        if hasattr(torch._dynamo.config, name))


def dynamo_settings() -> dict:
    return {name: getattr(torch._dynamo.config, name) for name in DYNAMO_SETTINGS}


@pytest.mark.parametrize("case", [
    Case(seqlen_q=33, seqlen_k=65, causal="bottom_right", nheads=4, nheads_k=2, head_dim=16),
    Case(seqlen_q=65, seqlen_k=33, causal="top_left", head_dim=16, softcap=5.0),
    Case(seqlen_q=40, seqlen_k=40, window=(5, 3), head_dim=16, alibi=True),
    Case(seqlen_q=40, seqlen_k=20, causal="bottom_right", head_dim=16, window=(4, -1)),
], ids=lambda c: c.id)
def test_flex_adapter_masks_and_score_mods(case):
    """Eager flex_attention stands in for the compiled one (which costs seconds per shape on a CPU)."""
    eager = dataclasses.replace(flex.BACKEND, fn=lambda *a, **k: flex.attention(*a, flex=flex_attention, **k))
    inputs = make_inputs(case, "cpu")
    out = call(eager, inputs.q, inputs.k, inputs.v, case)
    assert torch.allclose(out.double(), reference.attention(inputs.q, inputs.k, inputs.v, case), atol=1e-5)


def test_flex_adapter_makes_its_mask_and_score_parameters_once(monkeypatch):
    """A tensor made from a Python number on the GPU is a copy from the host that waits for the GPU: made on
    every call, the speed check (whose GPU sleep ahead of each call hides its launch) would time the rest of
    the adapter's launch as flex's. The offsets, window sides and softcap are made once per value."""
    case = Case(seqlen_q=40, seqlen_k=40, causal="bottom_right", window=(5, 3), head_dim=16, alibi=True, softcap=5.0)
    inputs = make_inputs(case, "cpu")
    eager = dataclasses.replace(flex.BACKEND, fn=lambda *a, **k: flex.attention(*a, flex=flex_attention, **k))
    made = []

    class Counting:  # the adapter's torch, counting the tensors it makes from numbers
        def __getattr__(self, name):
            return getattr(torch, name)

        def tensor(self, *args, **kwargs):
            made.append(args)
            return torch.tensor(*args, **kwargs)

    monkeypatch.setattr(flex, "torch", Counting())
    flex._scalar.cache_clear()
    flex._block_mask.cache_clear()
    first = call(eager, inputs.q, inputs.k, inputs.v, case)
    assert made  # the counting sees the adapter's tensors
    made.clear()
    again = call(eager, inputs.q, inputs.k, inputs.v, case)
    assert made == [] and torch.equal(first, again)


def test_flex_adapter_never_captures_one_tensor_for_two_parameters():
    """Dynamo guards on which tensors a compiled function captures are one object: with one tensor per value,
    a window of (0, 0) beside a causal offset and an ALiBi offset of 0 made them one, and the next case,
    where they differ, compiled the variant again (13 such recompilations in a run of flex's standard tier
    on an H100). Each parameter has its own tensor, whatever the values."""
    case = Case(seqlen_q=40, seqlen_k=40, causal="bottom_right", window=(0, 0), head_dim=16, alibi=True, softcap=5.0)
    inputs = make_inputs(case, "cpu")
    captured = []

    def recording(q, k, v, score_mod=None, block_mask=None, **kwargs):
        for fn in (score_mod, block_mask.mask_mod):
            captured.extend(c.cell_contents for c in fn.__closure__ if isinstance(c.cell_contents, torch.Tensor))
        return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, **kwargs)

    flex._block_mask.cache_clear()
    call(dataclasses.replace(flex.BACKEND, fn=lambda *a, **k: flex.attention(*a, flex=recording, **k)),
         inputs.q, inputs.k, inputs.v, case)
    assert len(captured) >= 5  # the offset, the window's two sides, the softcap, the slopes, the ALiBi offset
    assert len({id(t) for t in captured}) == len(captured)


@pytest.mark.parametrize("causal,alignment,window,sq,sk", [
    (True, "bottom_right", (-1, -1), 1000, 700), (True, "top_left", (-1, -1), 700, 1000),
    (False, "bottom_right", (200, 0), 1100, 1100), (True, "bottom_right", (300, -1), 640, 1000),
    (False, "bottom_right", (0, 150), 513, 256)])
def test_flex_builds_a_block_mask_in_chunks_as_it_would_in_one_piece(monkeypatch, causal, alignment, window, sq, sk):
    """Built in chunks of whole query blocks (bounded memory at any length, nothing compiled), the block mask
    is the one create_block_mask builds in one piece: every block count and index, both directions; here in
    chunks of one and of two query blocks."""
    from torch.nn.attention.flex_attention import create_block_mask

    mask_mod = flex._mask_mod(causal, alignment, window, sq, sk, torch.device("cpu"))
    whole = create_block_mask(mask_mod, None, None, sq, sk, device="cpu")
    fields = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks", "q_indices",
              "full_q_num_blocks", "full_q_indices")
    for rows in (flex.BLOCK, 2 * flex.BLOCK):
        monkeypatch.setattr(flex, "MASK_CHUNK_VALUES", rows * sk)
        chunked = flex._built_in_chunks(mask_mod, sq, sk, torch.device("cpu"))
        assert chunked.seq_lengths == whole.seq_lengths and chunked.mask_mod is mask_mod
        for name in fields:
            assert torch.equal(getattr(chunked, name), getattr(whole, name)), (rows, name)


def test_compiled_flex_never_falls_back_to_eager_flex_attention(monkeypatch):
    """Past dynamo's recompile limit torch.compile quietly runs a function eagerly; for flex_attention that is
    the unfused reference (N^2 memory), which the suite would then judge instead of the compiled kernel.
    Compiling flex_attention raises the limit past a run's variants and makes reaching it an error."""
    config = torch._dynamo.config
    default = dict(recompile_limit=8, accumulated_recompile_limit=256, fail_on_recompile_limit_hit=False)
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)  # what the adapter compiles, not compiled here
    for static in (False, True):
        with config.patch(**default):
            flex._flex.__wrapped__(static)
            assert config.recompile_limit >= flex.RECOMPILE_LIMIT <= config.accumulated_recompile_limit
            assert config.fail_on_recompile_limit_hit
    with config.patch(recompile_limit=1, fail_on_recompile_limit_hit=True):  # what reaching it then does
        double = compile_(lambda x: x * 2, backend="eager")
        double(torch.ones(2))
        with pytest.raises(torch._dynamo.exc.FailOnRecompileLimitHit):
            double(torch.ones(2, dtype=torch.float64))  # a new dtype: a second variant


def test_compiled_flex_is_compiled_for_every_shape_except_where_it_is_timed(monkeypatch):
    """One compilation per variant, the same in every process (inductor's cache on disk then serves the
    other workers and the next run), and the speed check times the kernel compiled for its shape."""
    compiled = []

    def compile_(fn, **kwargs):
        if fn is flex_attention:  # not what torch compiles for itself (inside create_block_mask)
            compiled.append(kwargs)
        return fn  # eagerly: what it was compiled with is the point here

    monkeypatch.setattr(torch, "compile", compile_)
    monkeypatch.setattr(flex, "_flex", functools.cache(flex._flex.__wrapped__))  # a cache of this test's own
    case = Case(batch=1, seqlen_q=16, seqlen_k=16, nheads=2, head_dim=16, causal="bottom_right")
    inputs = make_inputs(case, "cpu")
    before = dynamo_settings()
    with torch._dynamo.config.patch(**before):  # _flex raises dynamo's limits: this test's alone
        untimed = call(flex.BACKEND, inputs.q, inputs.k, inputs.v, case)
        assert compiled == [{"dynamic": True}]
        monkeypatch.setattr(kernel_side, "_timing", True)  # as during kernel_side.speed_time
        timed = call(flex.BACKEND, inputs.q, inputs.k, inputs.v, case)
        call(flex.BACKEND, inputs.q, inputs.k, inputs.v, case)
        assert torch._dynamo.config.cache_size_limit >= flex.RECOMPILE_LIMIT  # the adapter's settings were made
    assert compiled == [{"dynamic": True}, {"dynamic": False}] and torch.equal(untimed, timed)
    assert dynamo_settings() == before  # and undone: the rest of the process keeps dynamo's own


def test_the_speed_checks_calls_are_known_as_timed_in_the_kernels_process(monkeypatch):
    from conformance.checks import speed

    seen = []  # time_case is what kernel_side.speed_time and tools/speed_gate.py both time through
    monkeypatch.setattr(speed, "time_interleaved", lambda *args, **kwargs: seen.append(kernel_side.timing()) or {})
    assert not kernel_side.timing()
    kernel_side.speed_time(flex.BACKEND, None, [], Case(), "cpu", "fwd", [], {})
    speed.time_case({"a": flex.BACKEND, "b": flex.BACKEND}, [], Case(), "cpu", "fwd", [])
    assert seen == [True, True] and not kernel_side.timing()


def test_pinned_sdpa_refuses_with_torchs_reason_instead_of_falling_back():
    inputs = make_inputs(Case(seqlen_q=8, seqlen_k=8, head_dim=16), "cpu")
    with pytest.raises(Unsupported, match="torch refused EFFICIENT_ATTENTION"):
        pinned(SDPBackend.EFFICIENT_ATTENTION)(inputs.q, inputs.k, inputs.v)


def test_flash_head_dims_come_from_the_library_symbols(tmp_path):
    def symbols(direction, dims):
        return b"".join(b"_Z12run_mha_%s_IN7cutlass6half_tELi%dELb0EEvR16Flash_fwd_params" % (direction.encode(), d)
                        for d in dims)

    lib = tmp_path / "flash_attn_2_cuda.so"
    lib.write_bytes(b"\x7fELF" + symbols("fwd", (64, 128, 256)) + symbols("bwd", (64, 128)))
    dims = flash.built_head_dims(str(lib))
    assert dims == frozenset(range(33, 65)) | frozenset(range(97, 129))  # 256 lacks a backward kernel
    assert flash.built_head_dims(str(tmp_path / "missing.so")) is None


def test_xformers_grouped_layout_maps_query_heads_to_their_kv_head():
    q = torch.arange(6).float().view(1, 1, 6, 1).expand(1, 1, 6, 2)  # head h holds h
    k = torch.arange(3).float().view(1, 1, 3, 1).expand(1, 1, 3, 2)
    gq, gk, _ = xformers._grouped(q, k, k)
    assert gq.shape == (1, 1, 3, 2, 2) and gk.shape == (1, 1, 3, 2, 2)
    for h in range(6):  # flash-attn's GQA: query head h reads kv head h // (6 / 3)
        assert gq[0, 0, h // 2, h % 2, 0] == h and gk[0, 0, h // 2, h % 2, 0] == h // 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the reasons given on a machine without a GPU")
def test_gpu_backends_say_why_they_are_unavailable(pytester):
    result = pytester.runpytest("--list-backends")
    result.stdout.fnmatch_lines(["sdpa-flash *unavailable: SDPA's flash kernel needs a CUDA GPU; torch * sees none",
                                 "flash *unavailable: flash_attn is not installed (pip install flash-attn*"])
    named = pytester.runpytest("--pyargs", "conformance.suite", "--backend=sdpa-cudnn")
    assert named.ret == pytest.ExitCode.USAGE_ERROR
    named.stderr.fnmatch_lines(["*backend 'sdpa-cudnn' is unavailable here: SDPA's cuDNN kernel needs a CUDA GPU*"])


def test_flash_refuses_softcap_with_dropout_as_the_library_does():
    """flash-attn 2.x raises "Softcapping does not support dropout for now": a skip with that reason
    (the fuzz test draws the two together), not a failure of a declared feature."""
    q = torch.zeros(1, 4, 1, 8)
    with pytest.raises(Unsupported, match="softcap with dropout"):
        flash.attention(q, q, q, dropout_p=0.1, softcap=5.0)


def test_flex_adapter_runs_a_featured_call_without_gradients_in_the_graph_compiled_for_them(monkeypatch):
    """Each grad mode is a compiled graph of its own, and the window, softcap, ALiBi and attn_bias checks call
    each case both ways: untimed, such a call without gradients runs the graph of a call with them (one
    compilation, not two) and returns a detached output. A call without those features keeps the graph
    users of torch.no_grad run; a call where q, k, v or the bias require grad, or a timed one, is passed as
    it came."""
    seen = []

    def recording(q, k, v, **kwargs):
        seen.append((torch.is_grad_enabled(), q.requires_grad, k.requires_grad, v.requires_grad))
        return q * 2

    monkeypatch.setattr(flex, "BACKWARD_DEVICES", ("cpu",))  # as on CUDA: flex has no backward on the CPU
    case = Case(batch=1, seqlen_q=8, seqlen_k=8, nheads=2, head_dim=16)
    inputs = make_inputs(case, "cpu")
    with torch.no_grad():
        out = flex.attention(inputs.q, inputs.k, inputs.v, window_size=(2, 0), flex=recording)
        assert seen == [(True, True, True, True)] and not out.requires_grad and torch.equal(out, inputs.q * 2)
        flex.attention(inputs.q, inputs.k, inputs.v, flex=recording)  # no feature: the inference graph
        assert seen[1] == (False, False, False, False)
    with torch.inference_mode():  # a user's inference: left as it comes
        flex.attention(inputs.q, inputs.k, inputs.v, window_size=(2, 0), flex=recording)
        assert seen.pop() == (False, False, False, False)
    assert not inputs.q.requires_grad  # the caller's tensors are left as they were
    bias = torch.zeros(1, 2, 8, 8, requires_grad=True)  # only the bias wants a gradient: a call with them
    flex.attention(inputs.q, inputs.k, inputs.v, attn_bias=bias, flex=recording)
    assert seen[2] == (True, False, False, False)
    grad = make_inputs(case, "cpu", requires_grad=True)
    assert flex.attention(grad.q, grad.k, grad.v, softcap=5.0, flex=recording).requires_grad
    monkeypatch.setattr(kernel_side, "_timing", True)  # as during kernel_side.speed_time
    flex.attention(inputs.q, inputs.k, inputs.v, softcap=5.0, flex=recording)
    assert seen[3:] == [(True, True, True, True), (True, False, False, False)]
