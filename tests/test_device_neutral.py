"""Device-neutral files: a run folder whose config says ``device: cuda`` (as one trained on a
GPU does) exports, diagnoses, predicts and rebuilds its model on this CPU-only machine with
the default ``--device auto``; ``--device cuda`` is a one-line error here. And the CUDA
random states in checkpoints: saved and restored when torch has CUDA, ignored without it
(checked with torch's CUDA functions patched, no GPU needed)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from pyro_gbnn import checkpoint, pipeline
from pyro_gbnn.config import dump_config
from pyro_gbnn.diagnose import main as diagnose_main
from pyro_gbnn.export import main as export_main
from pyro_gbnn.model_file import load_model
from pyro_gbnn.predict.cli import main as predict_main
from tests.conftest import GBNN, SPIKE_SLAB, SSVI, tiny_config, write_fake_mnist

RUNS = {"2dgbnn": GBNN, "int8": ["int8.scale_bits=[4]"], "spike-slab": SPIKE_SLAB + ["prune.epochs=1"], "ssvi": SSVI}
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")


def as_if_trained_on_a_gpu(run_dir) -> None:
    """Rewrite the saved config's device to ``cuda``, in checkpoint.pt and config.yaml."""
    state = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    state["config"]["device"] = "cuda"
    state.pop("format")
    checkpoint.save_checkpoint(run_dir / "checkpoint.pt", state)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["device"] = "cuda"
    (run_dir / "config.yaml").write_text(dump_config(config))


@pytest.fixture(scope="module")
def gpu_runs(tmp_path_factory):
    """Tiny finished 2DGBNN, INT8, pruned spike-and-slab and SSVI runs, their saved configs
    saying ``device: cuda``."""
    root = tmp_path_factory.mktemp("gpu_runs")
    data = write_fake_mnist(root / "data")
    for method, extra in RUNS.items():
        pipeline.run_fit(tiny_config(data, method, extra), root / method)
        as_if_trained_on_a_gpu(root / method)
    return root


def devices_of(*modules) -> set[str]:
    return {t.device.type for m in modules if m is not None for t in [*m.parameters(), *m.buffers()]}


def one_image(folder):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "digit.png"
    Image.fromarray((np.random.default_rng(0).random((28, 28)) * 255).astype(np.uint8)).save(path)
    return path


@no_gpu
@pytest.mark.parametrize("method", list(RUNS))
def test_a_gpu_run_folder_rebuilds_its_model_on_the_cpu(gpu_runs, method):
    saved = checkpoint.load_checkpoint(gpu_runs / method / "checkpoint.pt")["config"]
    assert saved["device"] == "cuda"
    run, network, guide = pipeline.load_run_model(gpu_runs / method)
    assert run.device == torch.device("cpu") and run.config["device"] == "cuda"
    assert devices_of(network, guide) == {"cpu"}
    x, _ = run.data.test[0]
    from pyro_gbnn.predict import predict_batch

    assert predict_batch(network, guide, x.unsqueeze(0), 2).shape == (2, 1, 10)


@no_gpu
@pytest.mark.parametrize("method", list(RUNS))
def test_a_gpu_run_exports_and_its_file_predicts_on_the_cpu(gpu_runs, tmp_path, capsys, method):
    model = tmp_path / "model.safetensors"
    assert export_main([str(gpu_runs / method), "--out", str(model)]) == 0
    assert json.loads(capsys.readouterr().out)["file"] == model.stat().st_size
    image = one_image(tmp_path / "images")
    assert predict_main([str(model), "--images", str(image), "--samples", "2", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert sum(row["probs"]) == pytest.approx(1, abs=1e-4)
    loaded = load_model(model)
    assert loaded.device == torch.device("cpu") and devices_of(loaded.network, loaded.guide) == {"cpu"}
    assert load_model(model, device="cpu").predict(torch.zeros(3, 1, 28, 28), 2).probs.shape == (3, 10)


@no_gpu
@pytest.mark.parametrize("method", ["2dgbnn", "int8"])
def test_a_gpu_run_is_diagnosed_on_the_cpu(gpu_runs, capsys, method):
    assert diagnose_main([str(gpu_runs / method), "--samples", "2"]) == 0
    written = capsys.readouterr().out
    assert "summary.md" in written and ("sharing_plane.png" in written) == (method == "2dgbnn")
    assert "Pareto k-hat" in (gpu_runs / method / "diagnostics" / "summary.md").read_text()


@no_gpu
def test_device_cuda_without_a_gpu_is_a_one_line_error(gpu_runs, tmp_path, capsys):
    model = tmp_path / "model.safetensors"
    run = str(gpu_runs / "2dgbnn")
    assert export_main([run, "--out", str(model), "--device", "cpu"]) == 0
    capsys.readouterr()
    image = str(one_image(tmp_path / "images"))
    for main, argv in [
        (export_main, [run, "--out", str(tmp_path / "other.safetensors"), "--device", "cuda"]),
        (diagnose_main, [run, "--device", "cuda"]),
        (predict_main, [str(model), "--images", image, "--device", "cuda:0"]),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "not available" in err and "CUDA" in err, err
    assert not (tmp_path / "other.safetensors").exists()


# ----------------------------------------------------------------------------- random states
class FakeCuda:
    """torch.cuda's generator functions for ``devices`` GPUs, states held in a list."""

    def __init__(self, monkeypatch, devices: int = 2, available: bool = True, initialized: bool = True) -> None:
        own = torch.Generator().manual_seed(devices)  # leaves the CPU stream under test alone
        self.states = [torch.randint(0, 256, (16,), dtype=torch.uint8, generator=own) for _ in range(devices)]
        self.set_calls = 0
        monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: initialized)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: devices)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in self.states])
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", self.set_all)

    def set_all(self, states) -> None:
        self.set_calls += 1
        for i, s in enumerate(states):
            self.states[i] = s.clone()


def test_cuda_random_states_are_saved_and_restored(monkeypatch, tmp_path):
    cuda = FakeCuda(monkeypatch)
    saved = [s.clone() for s in cuda.states]
    state = checkpoint.rng_state()
    assert [t.dtype for t in state["cuda"]] == [torch.uint8, torch.uint8]
    checkpoint.save_checkpoint(tmp_path / "c.pt", {"rng": state})
    state = checkpoint.load_checkpoint(tmp_path / "c.pt")["rng"]  # weights_only: plain uint8 tensors
    cpu_draw = torch.rand(3)
    cuda.states = [torch.zeros(16, dtype=torch.uint8) for _ in range(2)]  # the GPUs' streams move on
    random.random(), np.random.rand()
    checkpoint.set_rng_state(state)
    assert all(torch.equal(a, b) for a, b in zip(cuda.states, saved))
    assert torch.equal(torch.rand(3), cpu_draw)


def test_cuda_states_need_an_initialised_cuda_and_are_ignored_without_one(monkeypatch):
    FakeCuda(monkeypatch, initialized=False)
    assert "cuda" not in checkpoint.rng_state()  # reading them would start CUDA for nothing

    monkeypatch.undo()
    FakeCuda(monkeypatch)
    state = checkpoint.rng_state()
    cpu_draw = torch.rand(3)
    monkeypatch.undo()
    FakeCuda(monkeypatch, available=False)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: pytest.fail("no CUDA to restore to"))
    checkpoint.set_rng_state(state)  # a GPU run resumed on a CPU: the CPU streams are restored
    assert torch.equal(torch.rand(3), cpu_draw)


@no_gpu
def test_a_state_without_cuda_leaves_the_gpus_generators_alone(monkeypatch):
    state = checkpoint.rng_state()  # this machine: no CUDA
    assert "cuda" not in state
    cuda = FakeCuda(monkeypatch)
    before = [s.clone() for s in cuda.states]
    checkpoint.set_rng_state(state)
    assert cuda.set_calls == 0 and all(torch.equal(a, b) for a, b in zip(cuda.states, before))


def test_states_of_more_gpus_than_this_machine_has_restore_the_ones_it_has(monkeypatch):
    state = FakeCuda(monkeypatch, devices=4) and checkpoint.rng_state()
    monkeypatch.undo()
    cuda = FakeCuda(monkeypatch, devices=1)
    checkpoint.set_rng_state(state)
    assert cuda.set_calls == 1 and torch.equal(cuda.states[0], state["cuda"][0])


def test_distributed_rng_states_carry_the_cuda_states(monkeypatch):
    from pyro_gbnn import distributed

    cuda = FakeCuda(monkeypatch)
    saved = [s.clone() for s in cuda.states]
    state = distributed.rng_states()  # one process: this rank's state itself
    cuda.states = [torch.zeros(16, dtype=torch.uint8) for _ in range(2)]
    distributed.set_rng_states(state)
    assert all(torch.equal(a, b) for a, b in zip(cuda.states, saved))
    cuda.states = [torch.zeros(16, dtype=torch.uint8) for _ in range(2)]
    distributed.set_rng_states({"ranks": [state]})  # the layout of a data-parallel checkpoint
    assert all(torch.equal(a, b) for a, b in zip(cuda.states, saved))


def test_checkpoints_are_written_with_cpu_tensors_only(tmp_path):
    """GPU tensors (fake ones here: no GPU needed) are written as CPU tensors, keeping the
    state's structure: dict types and a state_dict's _metadata, tuples, shared tensors."""
    from collections import OrderedDict, namedtuple

    from torch._subclasses.fake_tensor import FakeTensorMode

    Pair = namedtuple("Pair", "a b")
    with FakeTensorMode(allow_non_fake_inputs=True):
        weight = torch.ones(3, device="cuda")
        net = OrderedDict(weight=weight, tied=weight)
        net._metadata = {"": {"version": 1}}
        state = {"net": net, "opt": [(weight, 1)], "pair": Pair(weight, "x"), "rng": torch.zeros(2, dtype=torch.uint8)}
        moved = checkpoint._on_cpu(state, {})
    assert moved["net"]["weight"].device.type == "cpu" and moved["net"]["tied"] is moved["net"]["weight"]
    assert type(moved["net"]) is OrderedDict and moved["net"]._metadata == {"": {"version": 1}}
    assert moved["opt"][0][0].device.type == "cpu" and moved["opt"][0][1] == 1
    assert isinstance(moved["pair"], Pair) and moved["pair"].a.device.type == "cpu"
    assert moved["rng"] is state["rng"] and state["net"]["weight"].device.type == "cuda"  # the state is left as it was
    checkpoint.save_checkpoint(tmp_path / "c.pt", {"net": OrderedDict(w=torch.arange(3.0))})
    assert torch.equal(torch.load(tmp_path / "c.pt", weights_only=True)["net"]["w"], torch.arange(3.0))


@no_gpu
def test_a_run_saved_on_a_gpu_resumes_here_when_the_resume_command_moves_it(tmp_path, capsys):
    """A run whose config says ``device: cuda``, killed after its last checkpoint: ``--resume`` alone is a one-line
    error that names the way on; ``--resume --set device=auto`` continues it on the CPU (the
    device is the one setting a resume may change) and records where it finished."""
    from pyro_gbnn.fit import main as fit_main

    data = write_fake_mnist(tmp_path / "data")
    out = tmp_path / "run"
    pipeline.run_fit(tiny_config(data, "mean-field"), out)
    (out / "metrics.json").unlink()  # as if killed after its last checkpoint
    as_if_trained_on_a_gpu(out)
    capsys.readouterr()
    assert fit_main(["--out", str(out), "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not available on this machine" in err[0] and "--set device=auto" in err[0]
    assert fit_main(["--out", str(out), "--resume", "--no-progress", "--set", "device=auto"]) == 0
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["run"]["device"] == "cpu" and "mean_field" in saved["stages"]
    code = fit_main(["--out", str(out), "--resume", "--no-progress", "--set", "device=auto", "--set", "seed=3"])
    assert code == 2 and "seed 3 != saved 0" in capsys.readouterr().err, "other settings still may not change"
