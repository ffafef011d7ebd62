"""The package as a user installs it: a wheel, in a fresh virtual environment, away from the checkout."""

from __future__ import annotations

import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest
import tomllib

pytestmark = pytest.mark.integration  # several processes or a whole install: seconds each

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed_for_the_wheel():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(path.parent.relative_to(ROOT).parts) for path in (ROOT / "pyro_gbnn").rglob("__init__.py")
    }
    assert found | {"pyro_gbnn.configs"} == listed


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A virtual environment (seeing this interpreter's packages: torch, pyro, ...) with
    pyro_gbnn installed from a wheel built out of a copy of the sources."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("pyro_gbnn", "configs"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(dist), str(source)],
        check=True, capture_output=True, text=True,
    )
    (wheel,) = dist.glob("pyro_gbnn-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "pyro_gbnn/configs/cifar10_resnet20.yaml" in names, "the shipped configs are package data"
    env = tmp / "env"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env)
    python = env / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "--quiet", str(wheel)],
        check=True, capture_output=True, text=True,
    )
    return python


def _run(python: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_the_installed_command_and_its_shipped_configs(installed, tmp_path):
    where = _run(installed, "-c", "import pyro_gbnn; print(pyro_gbnn.__file__, pyro_gbnn.__version__)", cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    path, version = where.stdout.split()
    assert Path(path).is_relative_to(installed.parents[1]), f"imported {path}, not the wheel's copy"
    from pyro_gbnn.version import __version__

    assert version == __version__

    helped = _run(installed, "-m", "pyro_gbnn.fit", "--dataset", "mnist", "--help", cwd=tmp_path)
    assert helped.returncode == 0, helped.stderr
    assert "--dataset" in helped.stdout

    resolve = (
        "from pyro_gbnn.config import dataset_config_file, load_config\n"
        "path = dataset_config_file('cifar10')\n"
        "config = load_config(path)\n"
        "print(path, config['model'], config['method'], config['sharing']['num_components'])\n"
    )
    resolved = _run(installed, "-c", resolve, cwd=tmp_path)
    assert resolved.returncode == 0, resolved.stderr
    path, model, method, k = resolved.stdout.split()
    assert Path(path).is_relative_to(installed.parents[1])
    assert (model, method, k) == ("resnet20", "2dgbnn", "6000")
