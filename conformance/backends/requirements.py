"""Why a backend cannot run on this machine: the reasons its ``unavailable_reasons`` return."""

from __future__ import annotations

import importlib.util

import torch


def cuda_reasons(min_capability: tuple[int, int] | None = None, who: str = "this backend") -> list[str]:
    """A CUDA device, of at least ``min_capability`` when given."""
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        return [f"{who} needs a CUDA GPU; torch {torch.__version__} ({build}) sees none"]
    if min_capability is not None:
        have = torch.cuda.get_device_capability()
        if have < min_capability:
            return [f"{who} needs compute capability {min_capability[0]}.{min_capability[1]} or newer; "
                    f"{torch.cuda.get_device_name()} is {have[0]}.{have[1]}"]
    return []


def package_reasons(module: str, install: str) -> list[str]:
    """The top-level module is installed (found without importing it)."""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    return [] if found else [f"{module} is not installed ({install})"]


def import_reasons(module: str) -> list[str]:
    """The module imports (a wheel built for another torch or Python fails here)."""
    try:
        importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - any import failure is a reason, reported as such
        return [f"import {module} failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"]
    return []
