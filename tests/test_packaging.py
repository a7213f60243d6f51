"""The install: what a conformance run needs is a dependency, what only certify uses is the [certify]
extra, and the committed baselines ship inside the package, found from any folder."""

from pathlib import Path

import pytest

from conformance import baselines

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parent.parent


def _project():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _names(requirements):
    return {r.split(">")[0].split("=")[0].split("[")[0].strip() for r in requirements}


def test_certify_only_packages_are_an_extra_and_no_extra_names_unbuildable_packages():
    project = _project()
    assert _names(project["dependencies"]) == {"torch", "pytest", "hypothesis", "pytest-benchmark", "pytest-xdist"}
    extras = project["optional-dependencies"]
    assert _names(extras["certify"]) == {"transformers", "matplotlib", "rich"}
    assert not {"flash-attn", "xformers"} & set().union(*map(_names, extras.values()))


def test_the_committed_baselines_are_package_data(tmp_path):
    packaged = sorted(p.relative_to(baselines.PACKAGED_DIR) for p in baselines.PACKAGED_DIR.glob("*/*.json"))
    committed = sorted(p.relative_to(ROOT / "baselines") for p in (ROOT / "baselines").glob("*/*.json"))
    assert packaged == committed and committed
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "_baselines/*/*.json" in data["conformance"]


def test_default_baselines_dir_is_the_local_folder_else_the_packaged_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert baselines.default_dir() == baselines.PACKAGED_DIR  # an unrelated folder: the shipped baselines
    assert baselines.default_dir(update=True) == Path("baselines")  # never written inside the package
    (tmp_path / "baselines").mkdir()
    assert baselines.default_dir() == Path("baselines")  # a repository's own committed baselines win
