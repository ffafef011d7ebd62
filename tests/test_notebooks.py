"""Every tutorial notebook runs top to bottom in smoke mode on a tiny fake MNIST and CIFAR-10.

The notebooks read ``PYRO_GBNN_SMOKE``, ``PYRO_GBNN_DATA_DIR`` and ``PYRO_GBNN_OUT_DIR``;
the kernel inherits them from this process. It runs in the notebook's own folder, as
it would for a user, and its run folders go to ``tmp_path``. The kernel is this
interpreter (a kernel spec written under ``tmp_path``), so a fresh machine needs no
``ipykernel install`` and a ``python3`` kernel of some other environment is never used.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tests.test_data import write_cifar10_jpeg

pytestmark = pytest.mark.integration  # several processes or a whole install: seconds each

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
KERNEL_NAME = "pyro-gbnn-tests"


def _kernel_spec_dir(tmp_path: Path) -> Path:
    """A Jupyter data folder holding one kernel spec that launches this Python."""
    data_dir = tmp_path / "jupyter"
    spec = data_dir / "kernels" / KERNEL_NAME
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "pyro_gbnn tests",
        "language": "python",
    }))
    return data_dir


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_in_smoke_mode(path: Path, fake_mnist: Path, tmp_path: Path, monkeypatch) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    write_cifar10_jpeg(fake_mnist, per_class=4)  # beside the digits: notebook 04 trains on CIFAR-10
    monkeypatch.setenv("PYRO_GBNN_SMOKE", "1")
    monkeypatch.setenv("PYRO_GBNN_DATA_DIR", str(fake_mnist))
    monkeypatch.setenv("PYRO_GBNN_OUT_DIR", str(out_dir))
    monkeypatch.setenv("JUPYTER_PATH", str(_kernel_spec_dir(tmp_path)))
    # The package need not be installed: the kernel finds it through PYTHONPATH.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("OMP_NUM_THREADS", "2")

    before = sorted(p.name for p in path.parent.iterdir())
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=300,
        kernel_name=KERNEL_NAME,
        resources={"metadata": {"path": str(path.parent)}},
    )
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as err:
        pytest.fail(f"{path.name} failed in smoke mode:\n{err}", pytrace=False)

    after = sorted(p.name for p in path.parent.iterdir())
    assert after == before, f"{path.name} wrote {sorted(set(after) - set(before))} next to itself; use PYRO_GBNN_OUT_DIR"


def test_notebooks_are_saved_without_outputs() -> None:
    """Outputs stay out of git, so diffs show only what changed in the text and code."""
    assert NOTEBOOKS, "no notebooks found in notebooks/"
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        dirty = [i for i, c in enumerate(notebook.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
        assert not dirty, f"{path.name}: cells {dirty} have outputs; clear them before committing"
