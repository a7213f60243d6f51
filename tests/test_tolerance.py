"""The tolerance rule: its bound, its handling of non-finite values, and that it can fail."""

import math

import pytest

import torch

from conformance.tolerance import FORWARD_MULTIPLE, bound, compare, ulp


def test_ulp():
    assert ulp(torch.float32, 1.0) == 2.0**-23
    assert ulp(torch.bfloat16, 3.0) == 2.0**-6
    assert ulp(torch.float16, 0.0) > 0


def test_bound_formula():
    expected = 2 * 1e-3 + 0.5 * ulp(torch.float16, 0.3) + (math.sqrt(100) + 2) * ulp(torch.float32, 2.0)
    assert bound(1e-3, 2.0, torch.float16, 2.0, 100, 0.3) == pytest.approx(expected)
    assert bound(0.0, 1.0, torch.float64, 2.0, 4) == pytest.approx(ulp(torch.float64, 1.0) * 4.5)
    assert bound(1e-15, 1.0, torch.float64, 2.0, 1) == pytest.approx(3e-15 + 3.5 * ulp(torch.float64, 1.0))  # + E_ref


def test_compare_passes_within_and_fails_beyond():
    ref = torch.randn(100, dtype=torch.float64)
    within = compare("out", ref + 1e-7, ref, 1e-7, 1.0, torch.float32, FORWARD_MULTIPLE, 16)
    beyond = compare("out", ref + 1e-5, ref, 1e-7, 1.0, torch.float32, FORWARD_MULTIPLE, 16)
    assert within.passed and not beyond.passed and "EXCEEDS" in beyond.describe()


def test_non_finite_values_never_pass():
    ref = torch.zeros(4, dtype=torch.float64)
    actual = torch.tensor([0.0, float("nan"), 0.0, float("inf")])
    assert compare("out", actual, ref, 1.0, 1.0, torch.float32, 2.0, 1).nonfinite == 2
    ref_nan = torch.tensor([float("nan"), 0.0], dtype=torch.float64)
    assert not compare("out", torch.zeros(2), ref_nan, 1.0, 1.0, torch.float32, 2.0, 1).passed
    assert compare("out", torch.tensor([float("nan"), 0.0]), ref_nan, 0.0, 1.0, torch.float32, 2.0, 1).passed
