"""docs/architecture.md's recipes, each done exactly as written on a throwaway copy of the package, then
run through pytest: adding a backend and adding a check need nothing the recipe does not say (the tier
recipe is proven in test_tiers.py)."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import conformance

SUITE = ("-m", "pytest", "--pyargs", "conformance.suite", "-p", "no:cacheprovider", "--tier=quick", "--fuzz=off",
         "--results-file=")


def _copy(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    shutil.copytree(Path(conformance.__file__).parent, root / "conformance",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return root / "conformance"


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"the recipe's anchor {old!r} is not in {path.name}"
    path.write_text(text.replace(old, new, 1))


def _pytest(package: Path, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(package.parent)}
    return subprocess.run([sys.executable, *SUITE, *args], cwd=package.parent, env=env, capture_output=True, text=True)


def test_add_a_backend(tmp_path):
    package = _copy(tmp_path)
    # 1. a module in conformance/backends/ defining BACKEND
    (package / "backends" / "mine.py").write_text(
        '"""A backend added by the recipe."""\n'
        "from conformance.backend import Backend\n"
        "from conformance.backends import naive\n"
        "from conformance.capabilities import Capabilities\n\n"
        'BACKEND = Backend("mine", naive.attention, Capabilities(dtypes=frozenset({"fp32"}), causal=()),\n'
        '                  description="the recipe\'s backend")\n')
    # 2. one line in registry.BUILTIN
    _edit(package / "registry.py", 'BUILTIN = {\n', 'BUILTIN = {\n    "mine": "conformance.backends.mine",\n')
    listed = subprocess.run([sys.executable, "-m", "conformance", "list-backends"], cwd=package.parent,
                            env={**os.environ, "PYTHONPATH": str(package.parent)}, capture_output=True, text=True)
    assert "mine            available" in listed.stdout and "the recipe's backend" in listed.stdout, listed.stderr
    run = _pytest(package, "--backend=mine", "--check=forward")
    assert run.returncode == 0 and re.search(r"^mine +[1-9]\d*/0/\d+ +pass", run.stdout, re.M), run.stdout[-2000:]


NEW_CHECK = '''"""A check added by the recipe: the output has q's shape and is finite."""

import torch

from conformance.backend import Backend, call
from conformance.case import Case
from conformance.checks.check import Check
from conformance.inputs import make_inputs
from conformance.tiers import grid
from conformance.verdict import Verdict


def cases(tier: str) -> list[Case]:
    return grid(tier, [Case(batch=1, seqlen_q=9, seqlen_k=9, nheads=2, head_dim=16)])


def run(backend: Backend, case: Case, device: str) -> Verdict:
    verdict = Verdict("finite_only", backend.name, case, device)
    inputs = make_inputs(case, device)
    if not bool(torch.isfinite(call(backend, inputs.q, inputs.k, inputs.v, case)).all()):
        verdict.fail("finite", "not finite")
    return verdict


CHECK = Check("finite_only", cases, run)
'''


def test_add_a_check(tmp_path):
    package = _copy(tmp_path)
    # 1. a module in conformance/checks/ ending with CHECK = Check(name, cases, run, ...)
    (package / "checks" / "finite_only.py").write_text(NEW_CHECK)
    # 2. its module in the tuple that builds CHECKS
    _edit(package / "checks" / "__init__.py", "from conformance.checks import (", "from conformance.checks import (finite_only, ")
    _edit(package / "checks" / "__init__.py", "for m in (", "for m in (finite_only, ")
    # 3. one test function in conformance/suite/test_conformance.py
    with open(package / "suite" / "test_conformance.py", "a") as f:
        f.write('\n\n@pytest.mark.attention_check("finite_only")\n'
                "def test_finite_only(attn_backend, attn_case, attn_check):\n    attn_check(attn_backend, attn_case)\n")
    # 4. a mutant it catches (here a kernel returning NaN, by import string)
    (package.parent / "nan_kernel.py").write_text("import torch\ndef fn(q, k, v, **kw): return torch.full_like(q, float('nan'))\n")
    good = _pytest(package, "--backend=naive", "--check=finite_only")
    assert good.returncode == 0 and "1 passed" in good.stdout, good.stdout[-2000:]
    bad = _pytest(package, "--backend=nan_kernel.py:fn", "--check=finite_only")
    assert bad.returncode == 1 and "[finite] not finite" in bad.stdout, bad.stdout[-2000:]


TEMPERATURE_KERNEL = '''from conformance.backends import naive


def fn(q, k, v, temperature=1.0, softmax_scale=None, **kw):
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    return naive.attention(q, k, v, softmax_scale=scale / temperature, **kw)


fn.conformance_capabilities = {"temperature": True}
'''


def test_add_a_case_feature(tmp_path):
    package = _copy(tmp_path)
    # 1. a field of Case, its default the value that means "not used"
    _edit(package / "case.py", "    seed: int = 0\n", "    temperature: float = 1.0\n    seed: int = 0\n")
    # 2. a row of features.FEATURES: id token, keyword arguments, fuzz draw
    _edit(package / "features.py", "FEATURES: tuple[Feature, ...] = (\n",
          "FEATURES: tuple[Feature, ...] = (\n"
          '    Feature("temperature", "temperature", 1.0, "temp", encode=lambda v: f"{v:g}", decode=float,\n'
          '            kwargs=lambda case, device: {"temperature": case.temperature},\n'
          '            draw=lambda draw, fields, max_seqlen: fields.update(temperature=2.0)),\n')
    # 3. its flag in Capabilities, named as the feature
    _edit(package / "capabilities.py", "    window: bool = False\n", "    temperature: bool = False\n    window: bool = False\n")
    # 4. its term in the formula (reference.py)
    _edit(package / "reference.py", "    capped = None\n", "    scores = r(scores / case.temperature)\n    capped = None\n")
    (package.parent / "hot.py").write_text(TEMPERATURE_KERNEL)
    (package.parent / "cold.py").write_text(TEMPERATURE_KERNEL.replace("scale / temperature", "scale"))
    case = "b1_q33_k47_h2_d16_fp32_temp2.5_seed1"
    run = _pytest(package, "--backend=hot.py:fn,cold.py:fn,naive", "--check=forward", f"--case={case}", "-rs")
    assert "hot.py:fn" in run.stdout and re.search(r"^hot\.py:fn +1/0/0 +pass", run.stdout, re.M), run.stdout[-3000:]
    assert re.search(r"^cold\.py:fn +0/1/0 +FAIL", run.stdout, re.M), run.stdout[-3000:]  # the term is in the reference
    assert "temperature not supported" in run.stdout, run.stdout[-3000:]  # naive does not declare it
