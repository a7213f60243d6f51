"""kernels/triton_flash, our own FlashAttention-2 kernel: its declaration is valid and honest about what
it leaves out, it is installed as the backend `triton`, CI runs it under the interpreter, and the
deliberately broken and slowed copies (variants.py) still apply to the current kernel. Its numbers are
checked by the suite itself (.ci/run under the interpreter; the GPU runs in the README)."""

import importlib.util
from pathlib import Path

import pytest

from conformance import registry

ROOT = Path(__file__).resolve().parent.parent
KERNEL = ROOT / "kernels" / "triton_flash"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"triton_flash_test_{name}", KERNEL / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_declaration_is_valid_and_leaves_out_what_the_kernel_does_not_do():
    pytest.importorskip("triton")
    flash = _load("flash")
    backend = registry.from_function(flash.attention, "triton")
    caps = backend.capabilities
    assert caps.backward and caps.memory == "linear" and caps.deterministic_backward
    assert caps.head_dims == {64, 128} and list(caps.causal) == ["bottom_right"]
    assert not (caps.window or caps.softcap or caps.alibi or caps.varlen or caps.kvcache or caps.dropout)
    if flash.INTERPRET:  # TRITON_INTERPRET=1: the CPU, and the dtypes the interpreter gets right
        assert caps.devices == {"cpu"} and caps.dtypes == {"fp16", "fp32"}
    else:
        assert caps.devices == {"cuda"} and caps.dtypes == {"fp16", "bf16"}


def test_it_is_the_entry_point_triton_and_ci_runs_it_under_the_interpreter():
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert config["project"]["entry-points"][registry.ENTRY_POINT_GROUP]["triton"] == "triton_flash.flash:attention"
    found = config["tool"]["setuptools"]["packages"]["find"]
    assert "kernels" in found["where"] and "triton_flash*" in found["include"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "--backend=kernels/triton_flash/flash.py:attention" in ci
    assert "--check=forward,gradients,causal,sanity" in ci


@pytest.mark.parametrize("name", ["no-rescale", "extra-pass"])
def test_the_variants_still_apply_to_the_kernel(tmp_path, name):
    variants = _load("variants")
    out = variants.make(name, tmp_path / "flash.py")
    assert out.read_text() != (KERNEL / "flash.py").read_text()
    compile(out.read_text(), str(out), "exec")
