"""The memory check's meter and fit, and the speed check's timing, verification, baselines and verdict,
proven on the CPU (on a GPU the same code reads the CUDA allocator and device events)."""

import dataclasses
import json

import pytest
import torch

from conformance import baselines, speed
from conformance.backends import naive, tiled
from conformance.case import Case
from conformance.checks import execute
from conformance.checks import memory as memory_check
from conformance.checks import speed as speed_check
from mutants import stale_cache

SMALL = Case(batch=2, seqlen_q=256, seqlen_k=256, nheads=4, head_dim=32, dtype="fp32", seed=5)


def test_meter_and_fit_classify_naive_quadratic_and_tiled_linear():
    case = memory_check.cases("quick")[0]
    for backend, expected in ((naive.BACKEND, "quadratic"), (tiled.BACKEND, "linear")):
        verdict = execute("memory", backend, case, "cpu", {"tier": "quick"})
        assert verdict.passed, verdict.message()
        for mode in ("fwd", "fwdbwd"):
            assert verdict.measurements[mode]["measured_class"] == expected, verdict.measurements[mode]


def test_a_backend_declared_linear_that_materialises_the_matrix_fails():
    liar = dataclasses.replace(naive.BACKEND, name="naive-declared-linear",
                               capabilities=dataclasses.replace(naive.BACKEND.capabilities, memory="linear"))
    verdict = execute("memory", liar, memory_check.cases("quick")[0], "cpu", {"tier": "quick"})
    assert verdict.failed_properties == {"memory-growth"}
    assert "declared linear, but peak extra memory grows as N^1." in verdict.message() and "MiB" in verdict.message()


def test_memory_budget_reports_the_longest_length_within_it():
    verdict = execute("memory", naive.BACKEND, memory_check.cases("quick")[0], "cpu",
                      {"tier": "quick", "memory_budget_gb": 30 / 1024})
    assert verdict.measurements["fwd"]["longest_within_budget"] == 512  # 22 MiB at 512, 76 MiB at 1024


def _options(tmp_path, **more):
    return {"baselines_dir": str(tmp_path), "allow_cpu_timing": True, **more}


def test_two_times_slower_backend_fails_against_the_recorded_baseline(tmp_path):
    recorded = execute("speed", naive.BACKEND, SMALL, "cpu", _options(tmp_path, update_baselines=True))
    assert recorded.passed, recorded.message()
    file = baselines.path(tmp_path, baselines.arch_key("cpu"), "naive")
    stored = json.loads(file.read_text())
    assert stored["arch"] == baselines.arch_key("cpu") and set(stored["cases"]) == {f"fwd:{SMALL.id}", f"fwdbwd:{SMALL.id}"}

    def twice(*args, **kwargs):
        naive.attention(*args, **kwargs)
        return naive.attention(*args, **kwargs)

    slow = dataclasses.replace(naive.BACKEND, fn=twice)  # same name: judged against naive's baseline
    verdict = execute("speed", slow, SMALL, "cpu", _options(tmp_path))
    assert verdict.failed_properties == {"slower"}
    assert "slower than" in verdict.message() and str(file) in verdict.message() and "IQR" in verdict.message()


def test_verdict_logic_on_recorded_timings():
    def entry(median, iqr, ref_median=2.0, rounds=100):
        return speed.record({"median_ms": median, "iqr_ms": iqr, "rounds": rounds},
                            {"median_ms": ref_median, "iqr_ms": 0.02, "rounds": rounds})

    base, same, ten = entry(1.00, 0.01), entry(1.01, 0.01), entry(1.10, 0.01)
    drift = entry(1.10, 0.01, ref_median=2.2)  # the whole GPU 10% slower: clocks, not the kernel
    overcorrected = entry(1.15, 0.01, ref_median=2.58)  # seen on an H100: case +15%, matrix product +29%
    faster_ratio_only = entry(1.00, 0.01, ref_median=1.8)  # the reference sped up, the case did not change
    noisy = entry(1.10, 1.20, rounds=10)  # a spread so wide that 10% is within its standard error
    assert not speed.judge(same, base)["slower"]
    judged = speed.judge(ten, base)
    assert judged["slower"] and judged["absolute_slower"] and judged["relative_slower"]
    assert abs(judged["absolute_change"] - 0.10) < 1e-9 and abs(judged["reference_change"]) < 1e-9
    drifted = speed.judge(drift, base)  # gated on absolute time; the report shows the machine moved too
    assert drifted["slower"] and not drifted["relative_slower"] and abs(drifted["reference_change"] - 0.10) < 1e-9
    assert speed.judge(overcorrected, base)["slower"]  # the ratio would call it 10% faster: not trusted to gate
    ratio_only = speed.judge(faster_ratio_only, base)
    assert ratio_only["relative_slower"] and not ratio_only["slower"]  # not slower in time: no failure
    assert not speed.judge(noisy, base)["slower"]  # within a spread of 20%


def test_timed_outputs_are_checked_so_a_caching_kernel_cannot_post_a_time(tmp_path):
    forward_only = dataclasses.replace(naive.BACKEND.capabilities, backward=False)
    cheat = dataclasses.replace(naive.BACKEND, name="stale-cache", fn=stale_cache, capabilities=forward_only)
    verdict = execute("speed", cheat, SMALL.replace(seed=77), "cpu", _options(tmp_path, update_baselines=True))
    assert "timed-output" in verdict.failed_properties
    assert not baselines.path(tmp_path, baselines.arch_key("cpu"), "stale-cache").exists()  # nothing recorded


def test_baseline_files_are_validated_and_keyed_by_architecture(tmp_path):
    arch = baselines.arch_key("cpu")
    file = baselines.path(tmp_path, arch, "naive")
    assert speed_check.skip_reason(naive.BACKEND, SMALL, "cpu", _options(tmp_path)).startswith("no baseline for this case")
    file.parent.mkdir(parents=True)
    file.write_text("{not json")
    with pytest.raises(baselines.BaselineError, match="not valid JSON"):
        baselines.load(file, arch)
    baselines.save(file, {"schema": baselines.SCHEMA, "arch": "sm90-nvidia-h100-80gb-hbm3", "cases": {}})
    reason = speed_check.skip_reason(naive.BACKEND, SMALL, "cpu", _options(tmp_path))
    assert "recorded on 'sm90-nvidia-h100-80gb-hbm3', not this GPU" in reason and "not used" in reason
    file.write_text(json.dumps({"schema": 0, "cases": {}}))
    with pytest.raises(baselines.BaselineError, match="not a schema-1 baseline"):
        baselines.load(file, arch)
    assert list(file.parent.iterdir()) == [file]  # the atomic writes left no temporary file


def test_speed_check_needs_a_gpu_unless_told_otherwise():
    assert "times CUDA devices" in speed_check.skip_reason(naive.BACKEND, SMALL, "cpu", {})


def test_flop_count():
    case = Case(batch=2, seqlen_q=1024, seqlen_k=1024, nheads=16, head_dim=64, causal="bottom_right")
    assert speed.flops(case, "fwd") == 4 * 2 * 16 * 1024 * 1024 * 64 / 2
    assert speed.flops(case, "fwdbwd") == speed.flops(case, "fwd") * 3.5
    assert torch.cuda.is_available() or speed.peak_tflops("cpu") is None
