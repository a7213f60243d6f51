"""Stored speed baselines, one folder per GPU architecture: baselines/<arch key>/<backend>.json.

The arch key names the compute capability and the device model (``sm90-nvidia-h100-80gb-hbm3``), so a
baseline recorded on one GPU is never used on another. Cases are keyed by their stable id (the
benchmark mode and the case id), never by pytest node ids. Files are JSON, self-describing (schema,
arch, machine info with versions), validated on reading, and written atomically.
"""

from __future__ import annotations

import json
import os
import platform
import re
import tempfile
from pathlib import Path

import torch

SCHEMA = 1


class BaselineError(Exception):
    """A baseline file that is corrupt, of another schema, or recorded on another architecture."""


def arch_key(device: str) -> str:
    if device == "cuda":
        major, minor = torch.cuda.get_device_capability()
        name = torch.cuda.get_device_name()
        return f"sm{major}{minor}-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    cpu = platform.processor() or platform.machine()
    return "cpu-" + re.sub(r"[^a-z0-9]+", "-", cpu.lower()).strip("-")


def machine_info(device: str) -> dict:
    """GPU model, compute capability, driver, CUDA, cuDNN, torch and backend package versions."""
    from importlib.metadata import PackageNotFoundError, version

    info = {"arch": arch_key(device), "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if device == "cuda" else None}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, compute_capability=f"{props.major}.{props.minor}",
                    memory_gb=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count,
                    gpu_uuid=str(getattr(props, "uuid", "")) or None)  # which unit of the model recorded it
        try:
            import pynvml

            pynvml.nvmlInit()
            info["driver"] = pynvml.nvmlSystemGetDriverVersion()
        except Exception:  # noqa: BLE001 - the driver version is informative, not required
            info["driver"] = None
    for package in ("flash-attn", "xformers", "triton"):
        try:
            info[package] = version(package)
        except PackageNotFoundError:
            info[package] = None
    return info


LOCAL_DIR = "baselines"
PACKAGED_DIR = Path(__file__).parent / "_baselines"  # the committed baselines, shipped in the wheel


def default_dir(update: bool = False) -> Path:
    """The --baselines-dir default: ./baselines when the current folder has one (a checkout of this
    project, or a kernel repository's own committed baselines); else, from an installed package, the
    baselines shipped with it (read only: --update-baselines writes ./baselines instead)."""
    local = Path(LOCAL_DIR)
    if update or local.is_dir() or not PACKAGED_DIR.is_dir():
        return local
    return PACKAGED_DIR


def path(directory: str | os.PathLike, arch: str, backend: str) -> Path:
    return Path(directory) / arch / (re.sub(r"[^A-Za-z0-9_.-]+", "_", backend) + ".json")


def load(file: Path, arch: str) -> dict | None:
    """The baseline in ``file``, None when there is none; a BaselineError says what is wrong with it."""
    if not file.exists():
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BaselineError(f"baseline {file} is not valid JSON ({exc}); fix or remove it") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA or not isinstance(data.get("cases"), dict):
        raise BaselineError(f"baseline {file} is not a schema-{SCHEMA} baseline (schema {data.get('schema') if isinstance(data, dict) else None!r})")
    if data.get("arch") != arch:
        raise BaselineError(f"baseline {file} was recorded on {data.get('arch')!r}, not this GPU ({arch}): not used")
    return data


def updates(records: list[dict]) -> list[dict]:
    """The baseline updates a run's case records hold: the speed check's, in a run with --update-baselines,
    of its cases that passed. The journal keeps them as each case ends, so a run cut before its end (which
    writes them) loses none (``attn-conformance update-baselines``)."""
    return [r["measurements"]["baseline_update"] for r in records if "baseline_update" in (r.get("measurements") or {})]


def apply(updates: list[dict]) -> list[tuple[Path, int]]:
    """Write a run's baseline updates (the speed check's ``baseline_update`` measurements, from every
    worker): each file once, its stored cases merged with every update to it. Returns (file, number of
    entries written) per file."""
    by_file: dict[str, list[dict]] = {}
    for update in updates:
        by_file.setdefault(update["file"], []).append(update)
    written = []
    for name, group in by_file.items():
        file, last = Path(name), group[-1]
        data = load(file, last["arch"]) or {"schema": SCHEMA, "arch": last["arch"], "backend": last["backend"],
                                            "cases": {}}
        data.update(machine_info=last["machine_info"], reference_kernel=last["reference_kernel"])
        for update in group:
            data["cases"].update(update["cases"])
        save(file, data)
        written.append((file, sum(len(u["cases"]) for u in group)))
    return written


def save(file: Path, data: dict) -> None:
    """Write atomically: a temporary file in the same folder, then a rename over the old one. Temporary
    files that a killed save left behind are removed first."""
    file.parent.mkdir(parents=True, exist_ok=True)
    for stale in file.parent.glob(f".{file.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=f".{file.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a baseline is meant to be committed and shared
        os.replace(tmp, file)
    except BaseException:
        os.unlink(tmp)
        raise
