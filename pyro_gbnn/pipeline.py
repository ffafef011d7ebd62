"""The run layer behind ``python -m pyro_gbnn.fit`` and the notebooks: a run folder from a
config (:func:`run_fit`), one reopened (:func:`open_run`, :func:`model_after_stage`,
:func:`load_run_model`) or branched after a stage (:func:`branch_run`).

It drives a method (:mod:`pyro_gbnn.methods`), whose stages are written with
:mod:`pyro_gbnn.stages`. A method's stages run in order (e.g. for 2DGBNN: stage 0
``deterministic``, stage 1 ``mean_field``, stage 2 ``sharing``, stage 3 ``fine_tune``);
each finished epoch and each finished stage is written to ``OUT/checkpoint.pt``
atomically, with every random-number state, so ``resume=True`` continues a killed run and
reaches the same result as an uninterrupted one. ``OUT`` also receives ``config.yaml``,
``log.jsonl`` and, at the end, ``metrics.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pyro
import torch
from torch import nn
from torch.utils.data import Subset

from pyro_gbnn import distributed
from pyro_gbnn.allocator import keep_freed_memory
from pyro_gbnn.checkpoint import atomic_write_bytes, load_checkpoint, save_checkpoint
from pyro_gbnn.config import dump_config
from pyro_gbnn.data import DataSplits, load_dataset
from pyro_gbnn.devices import resolve_device
from pyro_gbnn.errors import UsageError
from pyro_gbnn.methods import resolve_method
from pyro_gbnn.models import build_model
from pyro_gbnn.report import FINAL_KEYS, format_table
from pyro_gbnn.run_info import run_environment
from pyro_gbnn.stages import FitRun
from pyro_gbnn.tracking import open_tracker
from pyro_gbnn.validation import validate_config

__all__ = ["run_fit", "open_run", "model_after_stage", "load_run_model", "branch_run"]


def _method(config: dict):
    return resolve_method(config["method"], config["method_args"])


def open_run(
    out_dir: str | Path, data_dir: str | Path | None = None, device: str | torch.device | None = "auto"
) -> FitRun:
    """A run folder's config, data, results and stage outputs, read once (``data_dir``: where
    the data are now, if they moved); :func:`model_after_stage` rebuilds its models.

    ``device`` (``auto``: the GPU when there is one, else the CPU; ``cpu``, ``cuda``,
    ``cuda:N``) is where its models are rebuilt, whatever device the run trained on: the
    saved ``device`` of the config is not read, so a GPU run opens on a CPU-only machine.
    """
    run_device = resolve_device(device)  # a missing GPU is a one-line error before any data is read
    out = Path(out_dir)
    state = load_checkpoint(out / "checkpoint.pt")
    config = state["config"]
    if data_dir is not None:
        config["data"]["dir"] = str(data_dir)
    return FitRun(
        config,
        out,
        _load_data(config),
        False,
        state["results"],
        state["outputs"],
        state["stage_time"],
        device=run_device,
    )


def model_after_stage(run: FitRun, stage: str | None = None) -> tuple[nn.Module, nn.Module | None]:
    """The model of ``run`` after ``stage`` (default: its last), ready to predict: (network, guide).

    The network is the deterministic one after ``deterministic`` (guide None), else the
    ``BayesianNetwork``; the guide is the one the stage evaluated (for ``quantize``, the
    quantized guide at the first of ``int8.scale_bits``; for ``sharing``, the stage-2
    guide before fine-tuning). Both are built on ``run.device`` (not the device the run
    trained on); the saved tensors are read on the CPU and copied there.
    """
    method = _method(run.config)
    stage = stage or method.stages[-1]
    if stage not in run.results:
        raise UsageError(f"the run in {str(run.out)!r} has not finished stage {stage!r}; resume it with --resume first")
    net = _build_net(run.config, run.data).to(run.device)
    return method.model_after(stage, run, net)


def load_run_model(
    out_dir: str | Path,
    data_dir: str | Path | None = None,
    stage: str | None = None,
    device: str | torch.device | None = "auto",
) -> tuple[FitRun, nn.Module, nn.Module | None]:
    """(run, network, guide) of a run folder after ``stage`` (default: its last), on
    ``device`` (default ``auto``: the GPU when there is one): :func:`open_run` then
    :func:`model_after_stage`."""
    run = open_run(out_dir, data_dir, device)
    return (run, *model_after_stage(run, stage))


def branch_run(
    base_dir: str | Path, out_dir: str | Path, after_stage: str, overrides: list[str] | tuple[str, ...] = ()
) -> dict:
    """A new run folder that starts where the run in ``base_dir`` stood when ``after_stage``
    finished (its results, outputs and the random state of that moment), with ``overrides``
    (``key=value``, e.g. ``method=int8`` or ``sharing.blend=false``) applied to its config;
    ``run_fit(config, out_dir, resume=True)`` then runs only the stages after it, so
    variants of a method's later stages share one trained stage 0 or stage 1. The new
    method's stages must begin with the base run's stages up to ``after_stage``. An
    existing branch is left as it is (resume it). Returns the branch's config."""
    out = Path(out_dir)
    if (out / "checkpoint.pt").exists():
        return load_checkpoint(out / "checkpoint.pt")["config"]
    from pyro_gbnn.config import apply_overrides

    state = load_checkpoint(Path(base_dir) / "checkpoint.pt")
    base_stages = _method(state["config"]).stages
    if after_stage not in state["results"] or after_stage not in base_stages:
        raise UsageError(
            f"the run in {str(base_dir)!r} has not finished stage {after_stage!r}; finish it before branching"
        )
    kept = base_stages[: base_stages.index(after_stage) + 1]
    config = apply_overrides(state["config"], list(overrides))
    validate_config(config)
    stages = _method(config).stages
    if stages[: len(kept)] != kept:
        raise UsageError(
            f"method {config['method']!r} runs stages {stages}, which do not begin with {kept}; branch after a stage "
            "they share"
        )
    for key in ("results", "outputs", "stage_time", "stage_rng"):
        state[key] = {stage: value for stage, value in state[key].items() if stage in kept}
    if after_stage in state["stage_rng"]:
        state["rng"] = state["stage_rng"][after_stage]  # as if the base run went on from there
    state.update(config=config, stage=after_stage, epoch=state["results"][after_stage].get("epochs", 0), states={})
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "config.yaml", lambda h: h.write(dump_config(config).encode()))
    save_checkpoint(out / "checkpoint.pt", state)
    return config


def _load_data(config: dict) -> DataSplits:
    data_cfg = config["data"]
    data = load_dataset(
        config["dataset"],
        data_cfg["dir"],
        val_fraction=data_cfg["val_fraction"],
        seed=config["seed"],
        augment=data_cfg["augment"],
        download=data_cfg["download"],
        cache_dir=data_cfg["cache_dir"],
    )
    subset = data_cfg["train_subset"]
    if subset is not None and subset < len(data.train):
        order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(config["seed"]))
        data.train = Subset(data.train, order[:subset].tolist())
    return data


def _build_net(config: dict, data: DataSplits) -> nn.Module:
    try:
        return build_model(config["model"], data.num_classes, data.in_channels, data.image_size, **config["model_args"])
    except TypeError as err:
        raise UsageError(
            f"model_args {config['model_args']} not accepted by model {config['model']!r}: {err}"
        ) from None


def run_fit(
    config: dict,
    out_dir: str | Path,
    resume: bool = False,
    progress: bool | None = None,
    data_dir: str | Path | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Run (or resume) every stage of ``config["method"]``; returns the contents of metrics.json.

    On resume the saved config is used; ``data_dir`` may point to the data's new place and
    ``device`` to another device (a run trained on a GPU continues on a CPU: the same
    computation, other random draws from there on).
    Runs with ``torch.use_deterministic_algorithms`` on (restored afterwards): the
    shared-mixture guide's gathers back-propagate through scatter-adds whose default CPU
    kernels sum in a thread-dependent order, and a resumed run must match exactly. On a
    GPU it warns where no deterministic kernel exists (``index_add_`` and ``scatter_add_``
    in backward use atomic adds there), and cuBLAS is given the fixed workspace it needs
    for repeatable matrix products (``CUBLAS_WORKSPACE_CONFIG``, unless already set).

    Under ``torchrun`` (``WORLD_SIZE`` > 1) the run is data-parallel
    (:mod:`pyro_gbnn.distributed`): ``data.batch_size`` is the global batch, split evenly
    over the processes; rank 0 writes every file; a run resumes with the number of
    processes that saved it.
    """
    keep_freed_memory()  # glibc: reuse freed activation buffers instead of faulting them in every step
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts: before the first GPU product
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        return _run_fit(config, out_dir, resume, progress, data_dir, device)
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def _run_fit(config, out_dir, resume, progress, data_dir, device) -> dict[str, Any]:
    out = Path(out_dir)
    checkpoint = out / "checkpoint.pt"
    state = None
    if resume:
        state = load_checkpoint(checkpoint)
        config = state["config"]
        if data_dir is not None:
            config["data"]["dir"] = str(data_dir)
        if device is not None:
            config["device"] = device
    elif checkpoint.exists() or (out / "metrics.json").exists():
        raise UsageError(f"{str(out)!r} already holds a run; pass --resume to continue it or choose another --out")
    validate_config(config)
    method = _method(config)
    joined = distributed.setup(config["device"])
    try:
        _check_world(config, state)
        distributed.barrier()  # every rank has checked the folder before rank 0 writes to it
        return _run_in_folder(config, out, method, state, progress)
    finally:
        distributed.teardown(joined)


def _check_world(config: dict, state: dict | None) -> None:
    """One-line errors for a data-parallel run that cannot split its batch or resume here."""
    world = distributed.world_size()
    if config["data"]["batch_size"] % world:
        raise UsageError(
            f"data.batch_size {config['data']['batch_size']} (the global batch) does not split over {world} "
            f"processes; use a multiple of {world}"
        )
    if state is not None:
        distributed.check_saved_world(state["rng"])


def _run_in_folder(config: dict, out: Path, method, state: dict | None, progress: bool | None) -> dict[str, Any]:
    if config["threads"]:
        torch.set_num_threads(int(config["threads"]))
    pyro.set_rng_seed(distributed.rank_seed(config["seed"]))
    with distributed.main_first():  # rank 0 fills decode caches that the others then read
        data = _load_data(config)
    device = resolve_device(config["device"])
    net = _build_net(config, data).to(device)
    out.mkdir(parents=True, exist_ok=True)
    if state is None and distributed.is_main():
        atomic_write_bytes(out / "config.yaml", lambda h: h.write(dump_config(config).encode()))
    tracker = open_tracker(config["tracker"] if distributed.is_main() else "none", out, config)
    try:
        run = FitRun(
            config, out, data, config["progress"] if progress is None else progress, tracker=tracker, device=device
        )
        return _run_stages(run, method, net, state)
    finally:
        tracker.close()


def _run_stages(run: FitRun, method, net: nn.Module, state: dict | None) -> dict[str, Any]:
    config = run.config
    if state is not None:
        run.results, run.outputs, run.stage_time = state["results"], state["outputs"], state["stage_time"]
        run.stage_rng = state["stage_rng"]
    for stage in method.stages:
        if stage in run.results:
            continue
        resume_state = state if state is not None and state["stage"] == stage and state["epoch"] > 0 else None
        if state is not None and resume_state is None:
            distributed.set_rng_states(state["rng"])
        method.run_stage(stage, run, net, resume_state)
        if stage not in run.results:
            raise UsageError(
                f"method {config['method']!r}: stage_{stage} returned without run.finish_stage({stage!r}, ...), so it "
                "has no results"
            )
        run.stage_rng[stage] = distributed.rng_states()  # a later run can branch off after this stage exactly
        run.save(stage, run.results[stage].get("epochs", 0), {})
        state = None
    final = run.results[method.stages[-1]]
    metrics = {
        **{k: final[k] for k in FINAL_KEYS if k in final},
        "dataset": config["dataset"],
        "model": config["model"],
        "method": config["method"],
        "run": run_environment(run.device, config["precision"]),
        "stages": run.results,
    }
    if distributed.is_main():
        atomic_write_bytes(run.out / "metrics.json", lambda h: h.write(json.dumps(metrics, indent=2).encode()))
    run.tracker.text("stage_table", format_table(metrics))
    return metrics
