"""benchmarks/gpu_check.py without a GPU: one line and exit 0; its synthetic MNIST reads as
MNIST; its planned runs cover every built-in method and are valid configs."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyro_gbnn import load_dataset
from pyro_gbnn.config import CONFIG_DIR, apply_overrides, load_config
from pyro_gbnn.methods import METHODS
from pyro_gbnn.validation import validate_config

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up while the file runs
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("gpu_check", None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU: the script would run its checks")
def test_without_a_gpu_it_prints_one_line_and_exits_0():
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120, cwd=SCRIPT.parents[1])
    assert done.returncode == 0
    lines = (done.stdout + done.stderr).splitlines()
    assert len(lines) == 1, lines
    assert "no CUDA GPU" in lines[0] and "nothing checked" in lines[0]


def test_synthetic_mnist_reads_as_mnist_with_its_sizes(gpu_check, tmp_path):
    root = gpu_check.write_synthetic_mnist(tmp_path / "data", n_train=40, n_test=12)
    assert gpu_check.has_mnist(root)
    data = load_dataset("mnist", root)
    assert (len(data.train), len(data.test)) == (40, 12)
    assert data.num_classes == 10 and data.in_channels == 1 and data.image_size == 28
    labels = gpu_check.read_idx(root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte")
    assert [int(data.test[i][1]) for i in range(12)] == labels.tolist()


def test_planned_runs_cover_every_built_in_method_and_are_valid_configs(gpu_check, tmp_path):
    runs = gpu_check.PLANNED_RUNS
    assert {run.method for run in runs} == set(METHODS)
    assert len({run.name for run in runs}) == len(runs)
    variants = {o for run in runs for o in run.overrides}
    assert {f"bnn.estimator={e}" for e in ("weight", "local", "flipout")} <= variants
    assert {f"fine_tune.semantics={s}" for s in ("tied", "hierarchical")} <= variants
    assert gpu_check.EXPORTED_RUN in {run.name for run in runs}
    for profile in (gpu_check.GPU_PROFILE, gpu_check.CPU_PROFILE):
        ctx = gpu_check.Context(profile, gpu=False, work=tmp_path)
        for run in (*runs, gpu_check.RESUME_RUN):
            assert (CONFIG_DIR / Path(run.config).name).is_file()
            config = load_config(CONFIG_DIR / Path(run.config).name)
            config = apply_overrides(config, [f"method={run.method}", *ctx.fit_overrides(run, device="cpu")])
            validate_config(config)
            assert config["data"]["train_subset"] == profile.train_subset
