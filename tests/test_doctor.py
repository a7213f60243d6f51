"""The environment doctor names a broken build only where an installed package fails to import."""

from conformance.certify import doctor

ENV = {"gpus": [{"name": "GPU", "compute_capability": "9.0"}], "nvcc": None, "cuda_runtime": "12.8",
       "torch": "2.13.0", "python": "3.11.7"}


def topics(rows):
    return [p.topic for p in doctor.problems(ENV, rows)]


def row(name, *reasons):
    return {"name": name, "usable": not reasons, "reasons": list(reasons), "devices": ["cuda"]}


def test_a_package_that_is_not_installed_is_no_broken_build():
    # our own install hint says "built for your torch": it must not read as a build for another torch
    rows = [row("xformers", "xformers is not installed (pip install xformers, built for your torch)"),
            row("flash", "flash_attn is not installed (pip install flash-attn --no-build-isolation)"),
            row("sdpa-flash", "SDPA's flash kernel needs a CUDA GPU; torch 2.13.0+cpu (a CPU-only build) sees none")]
    assert topics(rows) == []


def test_an_import_failing_on_another_torch_is_a_broken_build():
    rows = [row("flash", "import flash_attn_2_cuda failed: ImportError: /x/flash_attn_2_cuda.so: undefined symbol: "
                         "_ZN3c104cuda9SetDeviceEi"),
            row("xformers", "import xformers failed: RuntimeError: xFormers was built for PyTorch 2.4.0 with CUDA 12.1")]
    assert topics(rows) == ["flash built for another torch or Python", "xformers built for another torch or Python"]


def test_an_import_failing_otherwise_is_no_broken_build():
    rows = [row("flash3", "import flash_attn_interface failed: ModuleNotFoundError: No module named 'einops'")]
    assert topics(rows) == []
