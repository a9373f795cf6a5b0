"""Packaging: the wheel users install holds every module of stn_align/ and the shipped models."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    source = tmp_path_factory.mktemp("source")  # a clean copy: a stale build/ folder must not fill the gaps
    for name in ("pyproject.toml", "README.md", "stn_align", "models"):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy2
        copy(ROOT / name, source / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if copy is shutil.copytree else {}))
    try:
        import setuptools  # noqa: F401

        isolation = ["--no-build-isolation"]  # the build backend is here: no download needed
    except ImportError:
        isolation = []
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", "-w", str(out),
                             str(source)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    (found,) = out.glob("stn_align-*.whl")
    return found


def test_wheel_holds_every_module_and_model(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "stn_align").rglob("*.py")}
    assert modules, "no modules found"
    missing = sorted(modules - names)
    assert not missing, f"the wheel lacks {missing}: list their packages in pyproject.toml"
    models = {f"stn_align/models/{p.name}" for p in (ROOT / "models").glob("*.safetensors")}
    assert models and models <= names
    assert not any(name.startswith(("tests/", "benchmarks/", "docs/")) for name in names)


def test_installed_wheel_loads_the_default_model(wheel, tmp_path):
    """Installed into a folder (no checkout on sys.path), the package imports every module and loads a model."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    code = ("import importlib, pkgutil, stn_align; assert stn_align.__file__.startswith(%r), stn_align.__file__; "
            "[importlib.import_module(m.name) for m in pkgutil.walk_packages(stn_align.__path__, 'stn_align.') "
            "if 'ray_engine' not in m.name and not m.name.endswith('__main__')]; "
            "from stn_align import Aligner; a = Aligner.load('default', 'cpu'); print(a.transform)") % str(target)
    # -S: no site processing, so no .pth file (an editable install's import hook) can supply a missing module;
    # the dependencies come from this environment's site-packages, after the installed wheel.
    deps = [p for p in sys.path if p.endswith("site-packages")]
    result = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            env={"PYTHONPATH": os.pathsep.join([str(target), *deps]), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "projective"
