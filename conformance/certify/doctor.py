"""The environment doctor: versions, the GPU, which backends are usable and why not, and the setup
problems the lab notes warn about, recognised and explained with their fix."""

from __future__ import annotations

import platform
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version

import torch

from conformance import isolation

PACKAGES = ("torch", "triton", "flash-attn", "xformers", "transformers")


@dataclass
class Problem:
    level: str  # "fail" blocks certification, "warn" does not
    topic: str
    text: str
    fix: str

    def as_dict(self) -> dict:
        return asdict(self)


def environment() -> dict:
    env = {"python": platform.python_version(), "platform": platform.platform(), "cuda_runtime": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None, "gpus": []}
    for package in PACKAGES:
        try:
            env[package] = version(package)
        except PackageNotFoundError:
            env[package] = None
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            env["gpus"].append({"name": props.name, "memory_gb": round(props.total_memory / 2**30, 1),
                                "compute_capability": f"{props.major}.{props.minor}", "uuid": str(props.uuid),
                                **gpu_state(str(props.uuid))})
        try:
            import pynvml

            pynvml.nvmlInit()
            env["driver"] = pynvml.nvmlSystemGetDriverVersion()
        except Exception:  # noqa: BLE001 - informative only
            env["driver"] = None
    nvcc = shutil.which("nvcc")
    if nvcc:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
        match = re.search(r"release (\d+\.\d+)", out)
        env["nvcc"] = match.group(1) if match else None
    return env


def gpu_state(uuid: str) -> dict:
    """What NVML says of one GPU before the run: temperature, SM clock, and the compute processes of
    others on it (a GPU another job is using gives wrong timings and less memory). Empty without NVML."""
    import os

    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
        others = [p for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle) if p.pid != os.getpid()]
        return {"temperature_c": pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU),
                "sm_clock_mhz": pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
                "other_processes": len(others),
                "other_memory_gb": round(sum(p.usedGpuMemory or 0 for p in others) / 2**30, 2)}
    except Exception:  # noqa: BLE001 - informative only: NVML may be missing or refuse
        return {}


def backends() -> list[dict]:
    """Every known backend, loaded where the doctor runs (certify measures them here too)."""
    rows = []
    for row in isolation.describe_known(isolation.InProcess()):
        reasons = [row.error] if row.backend is None else row.unavailable
        rows.append({"name": row.spec, "usable": not reasons, "reasons": reasons,
                     "devices": [] if row.backend is None else sorted(row.backend.capabilities.devices)})
    return rows


def problems(env: dict, rows: list[dict]) -> list[Problem]:
    """The known setup problems present on this machine."""
    found = []
    if not env["gpus"]:
        found.append(Problem("fail", "no GPU", f"torch {env['torch']} sees no CUDA GPU: GPU certification needs a GPU; "
                             "only the CPU backends were checked", "run certify on the lab machine, with a CUDA "
                             "build of torch (a CPU build has no torch.version.cuda)"))
    for gpu in env["gpus"]:
        major, minor = map(int, gpu["compute_capability"].split("."))
        if (major, minor) < (8, 0):
            found.append(Problem("fail", "GPU too old for flash-attn", f"{gpu['name']} has compute capability "
                                 f"{major}.{minor}; flash-attn 2.x needs 8.0 (Ampere) or newer. The lab notes' "
                                 "'compute capability 7.5+' is out of date.", "use an A100/H100/RTX 30xx or newer, "
                                 "or the SDPA memory-efficient / math backends on this GPU"))
        if gpu.get("other_processes"):
            found.append(Problem("warn", "GPU in use by others", f"{gpu['name']} ({gpu['uuid']}) runs "
                                 f"{gpu['other_processes']} other compute process(es) holding {gpu['other_memory_gb']} GB: "
                                 "timings and memory figures on it are not the GPU's own",
                                 "certify when the GPU is idle (nvidia-smi lists what runs on it)"))
    if env.get("nvcc") and env["cuda_runtime"] and env["nvcc"].split(".")[0] != env["cuda_runtime"].split(".")[0]:
        found.append(Problem("warn", "CUDA version mismatch", f"torch is built for CUDA {env['cuda_runtime']}, the "
                             f"system toolkit (nvcc) is {env['nvcc']}: building flash-attn from source will fail "
                             "or mismatch", "install the toolkit matching torch.version.cuda, or a prebuilt wheel"))
    for row in rows:
        text = " ".join(row["reasons"])
        if broken_build(row["reasons"]):
            found.append(Problem("warn", f"{row['name']} built for another torch or Python", text[:600],
                                 f"reinstall {row['name']} built for torch {env['torch']} and Python {env['python']} "
                                 "(pip install --no-build-isolation from source; MAX_JOBS=2 if the build runs out "
                                 "of memory)"))
        elif "no kernel image" in text:
            found.append(Problem("warn", f"{row['name']} has no kernels for this GPU", text[:400],
                                 "install a build whose TORCH_CUDA_ARCH_LIST includes this GPU's compute capability"))
    return found


# What an extension built for another torch, CUDA or Python says when it is imported.
BROKEN_BUILD = re.compile(r"built for|undefined symbol|can't load C\+\+/CUDA extensions|ABI")


def broken_build(reasons: list[str]) -> bool:
    """A backend whose package is installed but fails to import as a build for another torch or Python.
    Only the import failures count: a package that is not installed, or a GPU that is missing, is not a broken
    build, although their texts (our own install hints, e.g. "built for your torch") may match the pattern."""
    return any(re.match(r"import \S+ failed: ", r) and BROKEN_BUILD.search(r.split(" failed: ", 1)[1])
               for r in reasons)


LAYOUT_HINT = ("flash-attn takes (batch, seqlen, heads, head_dim); SDPA and many tutorials use (batch, heads, "
               "seqlen, head_dim). A tensor in the wrong layout runs, silently, as a different problem, or fails "
               "with 'FlashAttention only supports ...'. Fix: q.transpose(1, 2) (and back for the output).")


def explain_findings(conformance_records: list[dict]) -> list[Problem]:
    """Known problems recognised in the conformance run's findings."""
    found = []
    for r in conformance_records:
        for f in r.get("findings", []):
            message = f.get("message", "")
            if "(batch, heads, seqlen, head_dim)" in message or "FlashAttention only supports" in message:
                found.append(Problem("fail", f"{r['backend']}: layout mistake", message[:300], LAYOUT_HINT))
            elif "no kernel image is available" in message:
                found.append(Problem("fail", f"{r['backend']}: no kernels for this GPU", message[:300],
                                     "install a build for this GPU's compute capability"))
    return found
