"""Property-based conformance: each check on cases hypothesis draws within the backend's declaration."""

import pytest


@pytest.mark.attention_fuzz
def test_fuzz(attn_backend, attn_fuzz_check, attn_fuzz):
    attn_fuzz(attn_backend, attn_fuzz_check)
