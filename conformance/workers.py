"""One GPU per pytest-xdist worker: which GPUs the host offers, which one each worker takes, and
pinning a worker to it before CUDA starts in that process.

The controller lists the visible GPUs (CUDA_VISIBLE_DEVICES if set, else every device) and hands
worker gwN the N-th, round robin when there are more workers than GPUs; the worker then narrows its
own CUDA_VISIBLE_DEVICES to that one GPU, so its cases, its isolated child processes and a context a
crash poisons stay on it. A worker whose GPU another worker also has is marked shared: correctness
cases may share a GPU, timed cases may not (the speed check skips there and says why).
"""

from __future__ import annotations

import os
from collections.abc import Callable

GPU_KEY, SHARED_KEY = "attention_conformance_gpu", "attention_conformance_gpu_shared_by"


def visible_gpus(environ: dict | None = None, count: Callable[[], int] | None = None) -> list[str]:
    """The GPUs workers may be pinned to, as CUDA_VISIBLE_DEVICES entries (indices, UUIDs or MIG ids)."""
    environ = os.environ if environ is None else environ
    listed = environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [entry.strip() for entry in listed.split(",") if entry.strip()]
    if count is None:
        import torch

        count = torch.cuda.device_count
    return [str(index) for index in range(count())]


def assign(worker_id: str, workers: int, gpus: list[str]) -> tuple[str | None, int]:
    """The GPU of worker ``gwN`` and how many workers share it (1: its own)."""
    if not gpus:
        return None, 0
    index = int(worker_id.removeprefix("gw"))
    gpu = gpus[index % len(gpus)]
    return gpu, sum(1 for other in range(max(workers, index + 1)) if gpus[other % len(gpus)] == gpu)


def pin(workerinput: dict, environ: dict | None = None) -> None:
    """Narrow this worker process to its GPU; must run before CUDA is initialised here."""
    gpu = workerinput.get(GPU_KEY)
    if gpu is None:
        return
    import torch

    if torch.cuda.is_initialized():
        raise RuntimeError(f"CUDA was initialised in worker {workerinput.get('workerid')} before it could be "
                           f"pinned to GPU {gpu}; a plugin or conftest started CUDA at import")
    (os.environ if environ is None else environ)["CUDA_VISIBLE_DEVICES"] = gpu
