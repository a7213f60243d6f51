"""pytest-xdist with one GPU per worker, without GPUs: the assignment, the pinning, one journal and a
per-GPU summary (CUDA_VISIBLE_DEVICES names GPUs this machine lacks; the cases run on the CPU)."""

import json

from conformance import workers
from conformance.case import Case
from conformance.options import RunOptions
from conformance.checks import speed
from conformance.backends import naive

PINNED_KERNEL = '''
import os
import torch.nn.functional as F

def attention(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
    """fails unless its process (the isolated child of a worker) was pinned to one GPU"""
    assert os.environ["CUDA_VISIBLE_DEVICES"] in ("7", "8"), os.environ.get("CUDA_VISIBLE_DEVICES")
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, scale=softmax_scale,
                                          enable_gqa=q.shape[1] != k.shape[1]).transpose(1, 2)

attention.conformance_capabilities = {"dtypes": ["fp32", "fp64"], "causal": [], "backward": False}
'''


def test_visible_gpus_follow_cuda_visible_devices_else_the_device_count():
    assert workers.visible_gpus({"CUDA_VISIBLE_DEVICES": "2, 5"}) == ["2", "5"]
    assert workers.visible_gpus({"CUDA_VISIBLE_DEVICES": "GPU-1a2b,GPU-3c4d"}) == ["GPU-1a2b", "GPU-3c4d"]
    assert workers.visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert workers.visible_gpus({}, count=lambda: 4) == ["0", "1", "2", "3"]


def test_each_worker_gets_a_gpu_and_knows_whether_it_shares_it():
    gpus = ["0", "1"]
    assert [workers.assign(f"gw{i}", 2, gpus) for i in range(2)] == [("0", 1), ("1", 1)]
    assert [workers.assign(f"gw{i}", 3, gpus) for i in range(3)] == [("0", 2), ("1", 1), ("0", 2)]
    assert workers.assign("gw0", 4, []) == (None, 0)


def test_pinning_narrows_the_worker_to_its_gpu():
    environ = {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    workers.pin({workers.GPU_KEY: "2", "workerid": "gw2"}, environ)
    assert environ["CUDA_VISIBLE_DEVICES"] == "2"
    untouched = {}
    workers.pin({workers.GPU_KEY: None}, untouched)
    assert untouched == {}


def test_speed_cases_never_share_a_gpu():
    case = Case(batch=1, seqlen_q=64, seqlen_k=64, nheads=2, head_dim=16, dtype="fp16")
    reason = speed.skip_reason(naive.BACKEND, case, "cuda", RunOptions(gpu_shared_by=2, update_baselines=True))
    assert reason and "shares its GPU with 1 other" in reason
    assert speed.skip_reason(naive.BACKEND, case, "cuda", RunOptions(gpu_shared_by=1, update_baselines=True)) is None


def test_xdist_run_pins_workers_and_keeps_one_journal_and_summary(pytester, monkeypatch):
    pytester.makepyfile(pinned=PINNED_KERNEL)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7,8")
    result = pytester.runpytest_subprocess("--pyargs", "conformance.suite", "-p", "no:cacheprovider", "-n", "2",
                                           "--tier=quick", "--check=forward,sanity", "--backend=pinned.py:attention",
                                           "--results-file=run.jsonl")
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed", 0) >= 4 and not outcomes.get("failed"), result.stdout.str()
    lines = [json.loads(line) for line in (pytester.path / "run.jsonl").read_text().splitlines()]
    assert [r["record"] for r in lines].count("run") == 1  # one journal, written by the controller
    cases = [r for r in lines if r["record"] == "case"]
    assert len(cases) == len({r["nodeid"] for r in cases}) == sum(outcomes.get(k, 0) for k in ("passed", "skipped"))
    assert {r["gpu"] for r in cases} == {"7", "8"} and {r["worker"] for r in cases} == {"gw0", "gw1"}
    result.stdout.fnmatch_lines(["*attention conformance*", "per GPU:", "  GPU 7 (gw0): * passed*",
                                 "  GPU 8 (gw1): * passed*"])
