"""Packaging: the wheel holds mm1_kernels and mm1_model only, one version, every package listed."""
import glob
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import mm1_kernels

ROOT = Path(__file__).resolve().parent.parent
tomllib = pytest.importorskip("tomllib")


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _package_folders():
    """Every importable package in the source tree, under its installed name."""
    found = set()
    for top, installed in (("mm1_kernels", "mm1_kernels"), ("model", "mm1_model")):
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top).parts
            found.add(".".join((installed, *rel)))
    return found


def test_pyproject_lists_every_package_and_nothing_else():
    cfg = _pyproject()["tool"]["setuptools"]
    assert set(cfg["packages"]) == _package_folders()
    assert not any(p.split(".")[0] in ("bench", "profiles", "tests") for p in cfg["packages"])


def test_one_version_string():
    assert _pyproject()["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "mm1_kernels.__version__"}
    assert "version" not in _pyproject()["project"]
    assert "version=" not in (ROOT / "setup.py").read_text()
    assert mm1_kernels.__version__.count(".") == 2


def test_wheel_holds_only_the_two_packages(tmp_path):
    env = {**os.environ, "MM1_SKIP_CUDA_BUILD": "1"}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps",
                    str(ROOT), "-w", str(tmp_path)], check=True, env=env, cwd=tmp_path)
    (wheel,) = tmp_path.glob("mm1_kernels-*.whl")
    assert wheel.name.startswith(f"mm1_kernels-{mm1_kernels.__version__}-")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"mm1_kernels", "mm1_model", f"mm1_kernels-{mm1_kernels.__version__}.dist-info"}, tops
    packages = {os.path.dirname(n).replace("/", ".") for n in names if n.endswith("/__init__.py")}
    assert packages == _package_folders()
    # Package data the kernels read at run time: every fused-MoE tile table.
    tables = {os.path.basename(p) for p in glob.glob(str(ROOT / "mm1_kernels" / "moe" / "configs" / "*.json"))}
    assert "default.json" in tables
    assert {os.path.basename(n) for n in names if n.startswith("mm1_kernels/moe/configs/")} == tables


def test_bench_and_profiles_are_not_installed_modules(tmp_path):
    """Outside a checkout, `import bench` / `import profiles` must fail: they are run from one."""
    code = "import importlib.util as u; print(u.find_spec('bench'), u.find_spec('profiles'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, check=True)
    assert out.stdout.split() == ["None", "None"]
