"""One test per check; the plugin parametrizes each over the selected backends and the check's cases."""

import pytest


@pytest.mark.attention_check("forward")
def test_forward(attn_backend, attn_case, attn_check):
    attn_check(attn_backend, attn_case)


@pytest.mark.attention_check("gradients")
def test_gradients(attn_backend, attn_case, attn_check):
    attn_check(attn_backend, attn_case)


@pytest.mark.attention_check("causal")
def test_causal(attn_backend, attn_case, attn_check):
    attn_check(attn_backend, attn_case)


@pytest.mark.attention_check("sanity")
def test_sanity(attn_backend, attn_case, attn_check):
    attn_check(attn_backend, attn_case)


@pytest.mark.attention_check("window")
def test_window(attn_backend, attn_case, attn_check):
    attn_check(attn_backend, attn_case)


@pytest.mark.attention_check("softcap")
def test_softcap(attn_backend, attn_case, attn_check):
    attn_check(attn_backend, attn_case)


@pytest.mark.attention_check("alibi")
def test_alibi(attn_backend, attn_case, attn_check):
    attn_check(attn_backend, attn_case)


@pytest.mark.attention_check("varlen")
def test_varlen(attn_backend, attn_case, attn_check):
    attn_check(attn_backend, attn_case)


@pytest.mark.attention_check("kvcache")
def test_kvcache(attn_backend, attn_case, attn_check):
    attn_check(attn_backend, attn_case)


@pytest.mark.attention_check("attn_bias")
def test_attn_bias(attn_backend, attn_case, attn_check):
    attn_check(attn_backend, attn_case)


@pytest.mark.attention_check("dropout")
def test_dropout(attn_backend, attn_case, attn_check):
    attn_check(attn_backend, attn_case)


@pytest.mark.attention_check("determinism")
def test_determinism(attn_backend, attn_case, attn_check):
    attn_check(attn_backend, attn_case)


@pytest.mark.attention_check("memory")
def test_memory(attn_backend, attn_case, attn_check):
    attn_check(attn_backend, attn_case)


@pytest.mark.attention_check("speed")
def test_speed(attn_backend, attn_case, attn_check):
    attn_check(attn_backend, attn_case)
