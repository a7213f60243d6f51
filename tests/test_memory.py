"""The memory check (conformance/checks/memory.py) and its meter and fit (conformance/memory_meter.py), proven on
the CPU (on a GPU the same code reads the CUDA allocator)."""

import dataclasses

from conformance.backends import naive, tiled
from conformance.checks import execute
from conformance.checks import memory as memory_check
from conformance.options import RunOptions


def test_meter_and_fit_classify_naive_quadratic_and_tiled_linear():
    case = memory_check.cases("quick")[0]
    for backend, expected in ((naive.BACKEND, "quadratic"), (tiled.BACKEND, "linear")):
        verdict = execute("memory", backend, case, "cpu", RunOptions(tier="quick"))
        assert verdict.passed, verdict.message()
        for mode in ("fwd", "fwdbwd"):
            assert verdict.measurements[mode]["measured_class"] == expected, verdict.measurements[mode]


def test_a_backend_declared_linear_that_materialises_the_matrix_fails():
    liar = dataclasses.replace(naive.BACKEND, name="naive-declared-linear",
                               capabilities=dataclasses.replace(naive.BACKEND.capabilities, memory="linear"))
    verdict = execute("memory", liar, memory_check.cases("quick")[0], "cpu", RunOptions(tier="quick"))
    assert verdict.failed_properties == {"memory-growth"}
    assert "declared linear, but peak extra memory grows as N^1." in verdict.message() and "MiB" in verdict.message()


def test_memory_budget_reports_the_longest_length_within_it():
    verdict = execute("memory", naive.BACKEND, memory_check.cases("quick")[0], "cpu",
                      RunOptions(tier="quick", memory_budget_gb=30 / 1024))
    assert verdict.measurements["fwd"]["longest_within_budget"] == 512  # 22 MiB at 512, 76 MiB at 1024


def test_templates_are_realised_in_each_backends_dtypes():
    from conformance import grid
    from conformance.checks import CHECKS

    def dtypes(**declared):
        caps = naive.BACKEND.capabilities.updated(declared) if declared else naive.BACKEND.capabilities
        return {r.case.dtype for r in grid.for_backend(CHECKS["memory"], caps, "cpu", "quick")}

    assert dtypes() == {"bf16"}  # a 16-bit dtype's bytes; PyTorch's CPU bf16 matmul, not its far slower fp16 one
    assert dtypes(dtypes=["fp16"]) == {"fp16"}  # a kernel with fp16 only has its memory measured too
