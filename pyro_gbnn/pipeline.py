"""The staged training pipeline behind ``python -m pyro_gbnn.fit`` and the notebooks: the
machinery every method shares (run folder, checkpoints, timed epochs, SVI, evaluation);
the methods and their stages live in :mod:`pyro_gbnn.methods`.

A method's stages run in order (e.g. for 2DGBNN: stage 0 ``deterministic``, stage 1
``mean_field``, stage 2 ``sharing``, stage 3 ``fine_tune``); each finished epoch and each
finished stage is written to ``OUT/checkpoint.pt`` atomically, with every random-number
state, so ``resume=True`` continues a killed run and reaches the same result as an
uninterrupted one. ``OUT`` also receives ``config.yaml``, ``log.jsonl`` and, at the end,
``metrics.json``.

Size accounting (``n_params_trainable``, ``size_bytes``): every value the optimizer
updates (``requires_grad``), counted once (for a mean-field BNN: a mean and a scale per
Bayesian weight plus the deterministic normalisation parameters; for 2DGBNN only the
component values its semantics trains); ``size_bytes`` = 4 bytes per such value (fp32).
Buffers (BatchNorm running statistics) are not counted. Compressed stages count
what they deploy instead: spike-and-slab the kept weights, SSVI the active ones, INT8 the
packed codes (each method's module says how).
"""

from __future__ import annotations

import itertools
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import pyro
import torch
from torch import nn
from torch.utils.data import Subset

from pyro_gbnn import distributed
from pyro_gbnn.allocator import keep_freed_memory
from pyro_gbnn.bayesian import BayesianNetwork
from pyro_gbnn.checkpoint import atomic_write_bytes, save_checkpoint
from pyro_gbnn.checkpoint import load_checkpoint as _load_state
from pyro_gbnn.config import dump_config, with_new_defaults
from pyro_gbnn.batchnorm import batchnorm_layers, per_draw_batchnorm_bytes
from pyro_gbnn.data import DataSplits, evaluation_seed, load_dataset, make_loader, posterior_draws_seed, set_loader_epoch
from pyro_gbnn.devices import resolve_device
from pyro_gbnn.elbo import AnalyticKL_ELBO
from pyro_gbnn.errors import UsageError
from pyro_gbnn.likelihoods import Categorical
from pyro_gbnn.metrics import classification_metrics, mean_and_spread
from pyro_gbnn.models import build_model
from pyro_gbnn.predict import FixedDraws, fixed_draws, predict
from pyro_gbnn.registry import build_prior
from pyro_gbnn.run_info import run_environment
from pyro_gbnn.tracking import Tracker, open_tracker
from pyro_gbnn.train import JsonLinesLog, elbo_step, make_lr_schedule, make_optimizer, train_epochs
from pyro_gbnn.validation import validate_config

__all__ = [
    "FINAL_KEYS", "FitRun", "run_fit", "open_run", "model_after_stage", "load_run_model", "count_trainable",
    "build_bnn", "train_variational", "timed_epochs", "restore_training", "load_guide_state", "branch_run",
]

FINAL_KEYS = (
    "accuracy", "nll", "ece", "brier", "n_params_trainable", "size_bytes",
    "n_outliers", "n_ellipses", "n_gaussians", "n_params_paper", "size_bytes_values", "size_bytes_index",
    "sparsity", "density", "train_macs_ratio", "scale_bits",
)


def load_checkpoint(path: Path) -> dict:
    """A run's checkpoint, its config completed with keys added since it was written."""
    state = _load_state(path)
    state["config"] = with_new_defaults(state["config"])
    return state


def count_trainable(module: nn.Module) -> int:
    """Number of values the optimizer updates (shared tensors counted once)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def build_bnn(net: nn.Module, config: dict, dataset_size: int) -> BayesianNetwork:
    """The Bayesian network of ``config["bnn"]`` (prior, estimator) around ``net``."""
    bnn_cfg = config["bnn"]
    return BayesianNetwork(
        net,
        build_prior(bnn_cfg["prior"]),
        Categorical(dataset_size),
        estimator=bnn_cfg["estimator"],
        bayesian_norm=bnn_cfg["bayesian_norm"],
    )


def _method(config: dict):
    from pyro_gbnn.methods import resolve_method  # the methods import this module

    return resolve_method(config["method"], config.get("method_args"))  # runs saved before method_args had none


@dataclass
class FitRun:
    """Everything the stages share: config, data, output paths and the checkpointed state."""

    config: dict
    out: Path
    data: DataSplits
    progress: bool
    results: dict[str, dict] = field(default_factory=dict)
    outputs: dict[str, dict] = field(default_factory=dict)
    stage_time: dict[str, float] = field(default_factory=dict)
    stage_rng: dict[str, dict] = field(default_factory=dict)
    tracker: Tracker = field(default_factory=Tracker)
    device: torch.device | None = None  # where the run computes; None: resolved from config["device"]
    _loaders: dict[str, Any] = field(default_factory=dict, repr=False)  # per split, when workers persist

    def __post_init__(self) -> None:
        if self.device is None:
            self.device = resolve_device(self.config["device"])

    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"

    @property
    def log(self) -> JsonLinesLog:
        return JsonLinesLog(self.out / "log.jsonl", self.tracker)

    @property
    def dataset_size(self) -> int:
        return len(self.data.train)

    def loader(self, split: str, epoch: int = 0):
        """Batches of ``split`` (the training split shuffled by (seed, epoch)); in a
        data-parallel run the training batches are this rank's shard of the global batch.
        With loader workers (``data.num_workers``) one loader per split keeps its workers
        for the whole run, moved from epoch to epoch."""
        data_cfg = self.config["data"]
        if data_cfg["num_workers"] > 0 and split in self._loaders:
            return set_loader_epoch(self._loaders[split], epoch)
        dataset = getattr(self.data, split)
        train = split == "train"
        replicas = distributed.world_size() if train else 1
        loader = make_loader(
            dataset,
            data_cfg["batch_size"] // replicas if train else data_cfg["eval_batch_size"],
            shuffle=train,
            seed=self.config["seed"],
            epoch=epoch,
            num_workers=data_cfg["num_workers"],
            pin_memory=self.device.type == "cuda",
            num_replicas=replicas,
            rank=distributed.rank(),
            persistent_workers=True,
        )
        if data_cfg["num_workers"] > 0:
            self._loaders[split] = loader
        return loader

    @property
    def eval_split(self) -> str:
        return "val" if self.data.val is not None else "test"

    def pretrained(self, net: nn.Module) -> nn.Module:
        """``net`` with the weights stage 0 (``deterministic``) finished with."""
        net.load_state_dict(self.outputs["deterministic"]["net"])
        return net

    def save(self, stage: str, epoch: int, states: dict[str, Any]) -> None:
        """The checkpoint (with every rank's random state; only rank 0 writes it)."""
        rng = distributed.rng_states()
        if not distributed.is_main():
            return
        save_checkpoint(
            self.checkpoint_path,
            {
                "config": self.config,
                "stage": stage,
                "epoch": epoch,
                "states": states,
                "results": self.results,
                "outputs": self.outputs,
                "stage_time": self.stage_time,
                "stage_rng": self.stage_rng,
                "rng": rng,
            },
        )

    def evaluate(self, bnn: nn.Module, guide: nn.Module | None, split: str, num_samples: int, repeat: int = 0) -> dict[str, float]:
        """Metrics of ``split`` under ``num_samples`` weight draws per batch, drawn from seeds
        of (run seed, batch): evaluating leaves the training's random stream alone, and in a
        data-parallel run each rank scores every world-size-th batch with the same draws as
        one process would, so the gathered metrics equal the one-process ones. With
        ``predict.batchnorm: per_draw`` every batch shares ``num_samples`` fixed draws, each
        with its own BatchNorm statistics (:meth:`fixed_draws`). ``repeat`` > 0 draws from
        other seeds (the spread a run reports, ``predict.evaluation_seeds``)."""
        pred_cfg, size = self.config["predict"], self.config["data"]["eval_batch_size"]
        dataset = getattr(self.data, split)
        mine = list(range(distributed.rank(), -(-len(dataset) // size), distributed.world_size()))
        items = [i for b in mine for i in range(b * size, min((b + 1) * size, len(dataset)))]
        shard = dataset if len(items) == len(dataset) else Subset(dataset, items)
        loader = make_loader(shard, size, shuffle=False, num_workers=self.config["data"]["num_workers"], pin_memory=self.device.type == "cuda")
        base = self.config["seed"] if repeat == 0 else posterior_draws_seed(self.config["seed"], repeat)
        seeds = [evaluation_seed(base, b) for b in mine]
        prediction = predict(bnn, guide, loader, num_samples=num_samples, sample_chunk=pred_cfg["sample_chunk"], seeds=seeds,
                             draws=self.fixed_draws(bnn, guide, num_samples, repeat))
        probs, labels = _gathered_batches(mine, prediction.probs, prediction.labels, size)
        return classification_metrics(probs, labels, n_bins=pred_cfg["ece_bins"])

    def fixed_draws(self, bnn: nn.Module, guide: nn.Module | None, num_samples: int, repeat: int = 0) -> FixedDraws | None:
        """Under ``predict.batchnorm: per_draw`` (for a guide over a network with BatchNorm):
        ``num_samples`` draws seeded by (run seed, ``repeat``), each with its BatchNorm
        statistics re-estimated on ``predict.batchnorm_batches`` training batches (the same
        seeded batches on every rank); else None (running statistics)."""
        if not self.per_draw_batchnorm(bnn, guide):
            return None
        return fixed_draws(bnn, guide, num_samples, self.batchnorm_batches(repeat), posterior_draws_seed(self.config["seed"], repeat))

    def per_draw_batchnorm(self, bnn: nn.Module, guide: nn.Module | None) -> bool:
        """Whether predictions of this model use per-draw BatchNorm statistics: ``predict.batchnorm:
        per_draw``, a guide, and BatchNorm layers in the network."""
        return self.config["predict"]["batchnorm"] == "per_draw" and guide is not None and bool(batchnorm_layers(bnn))

    def batchnorm_batches(self, repeat: int = 0) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        """The ``predict.batchnorm_batches`` training batches (seeded by (run seed, ``repeat``),
        the same on every rank and each time they are iterated) that re-estimate each draw's statistics."""
        seed = posterior_draws_seed(self.config["seed"], repeat)
        loader = make_loader(self.data.train, self.config["data"]["batch_size"], shuffle=True, seed=seed,
                             num_workers=self.config["data"]["num_workers"], pin_memory=self.device.type == "cuda")
        return _FirstBatches(loader, self.config["predict"]["batchnorm_batches"])

    def finish_stage(
        self,
        stage: str,
        bnn: nn.Module,
        guide: nn.Module | None,
        trained: nn.Module,
        output: dict,
        size: tuple[int, int] | None = None,
        epochs: int | None = None,
    ) -> None:
        """Test metrics and size of a finished stage; ``size`` = (parameters, bytes) of
        what the stage deploys, default: every trainable value of ``trained`` in fp32;
        ``epochs`` default: the stage's config section's."""
        num_samples = 1 if guide is None else self.config["predict"]["num_samples"]
        started = time.perf_counter()
        repeats = 1 if guide is None else self.config["predict"]["evaluation_seeds"]
        metrics = mean_and_spread([self.evaluate(bnn, guide, "test", num_samples, r) for r in range(repeats)])
        self.stage_time[stage] = self.stage_time.get(stage, 0.0) + time.perf_counter() - started  # wall time includes the test evaluation
        n_params = count_trainable(trained)
        n_params, size_bytes = (n_params, 4 * n_params) if size is None else size
        if self.per_draw_batchnorm(bnn, guide):  # a model file stores each draw's statistics
            size_bytes += per_draw_batchnorm_bytes(bnn, num_samples)
        self.results[stage] = {
            **metrics,
            **({"batchnorm": self.config["predict"]["batchnorm"]} if guide is not None else {}),
            "n_params_trainable": n_params,
            "size_bytes": size_bytes,
            "epochs": self.config.get(stage, {}).get("epochs", 0) if epochs is None else epochs,
            "wall_time_s": round(self.stage_time.get(stage, 0.0), 2),
        }
        self.outputs[stage] = output
        self.log.write({"stage": stage, "finished": True, "test": self.results[stage]})


class _FirstBatches:
    """The first ``count`` batches of a seeded loader, the same ones each time it is iterated."""

    def __init__(self, loader, count: int) -> None:
        self.loader, self.count = loader, count

    def __iter__(self):
        return itertools.islice(iter(self.loader), self.count)


def _gathered_batches(mine: list[int], probs: torch.Tensor, labels: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's predictions of its batches ``mine`` put back in batch order."""
    if not distributed.is_distributed():
        return probs, labels
    pieces = {}
    for batches, p, y in distributed.all_gather_objects((mine, probs, labels)):
        for i, b in enumerate(batches):
            pieces[b] = (p[i * size : (i + 1) * size], y[i * size : (i + 1) * size])
    ordered = [pieces[b] for b in sorted(pieces)]
    return torch.cat([p for p, _ in ordered]), torch.cat([y for _, y in ordered])


def timed_epochs(run: FitRun, stage: str, start_epoch: int, **kwargs) -> None:
    """:func:`~pyro_gbnn.train.train_epochs` with the stage's wall time accumulated across
    resumes and a checkpoint after every epoch: ``save_states()`` gives the stage's state
    dicts, an optional ``epoch_end(epoch)`` runs before each checkpoint."""
    save_states = kwargs.pop("save_states")
    epoch_end = kwargs.pop("epoch_end", None)
    clock = [time.perf_counter()]

    def on_epoch_end(epoch: int, record: dict) -> None:
        if epoch_end is not None:
            epoch_end(epoch)
        now = time.perf_counter()
        run.stage_time[stage] = run.stage_time.get(stage, 0.0) + now - clock[0]
        clock[0] = now
        run.save(stage, epoch, save_states())

    train_epochs(stage, start_epoch=start_epoch, on_epoch_end=on_epoch_end, log=run.log, progress=run.progress, device=run.device,
                 precision=run.config["precision"], **kwargs)
    run.stage_time[stage] = run.stage_time.get(stage, 0.0) + time.perf_counter() - clock[0]


def restore_training(resume: dict | None, key: str, module: nn.Module, optimizer, schedule) -> int:
    """Load a mid-stage checkpoint into the stage's objects; returns the epoch to start at."""
    if resume is None:
        return 0
    module.load_state_dict(resume["states"][key])
    optimizer.load_state_dict(resume["states"]["optimizer"])
    schedule.load_state_dict(resume["states"]["schedule"])
    distributed.set_rng_states(resume["rng"])
    return resume["epoch"]


def train_variational(
    run: FitRun,
    stage: str,
    bnn: BayesianNetwork,
    guide: nn.Module,
    resume: dict | None,
    first_epoch: int = 0,
    epoch_end: Callable[[int, torch.optim.Optimizer], None] | None = None,
    section: dict | None = None,
) -> AnalyticKL_ELBO:
    """SVI on the ELBO with the settings of ``section`` (default ``config[stage]``): means at
    ``lr``, scale-like parameters at ``lr_scale`` (appendix I.4; the guide's
    ``loc_parameters()`` and ``scale_parameters()``), the network's deterministic parameters
    at ``lr``. The KL weight rises linearly to ``kl_scale`` (1: the ELBO) over
    ``kl_warmup_epochs``; a guide's ``after_step(optimizer)`` runs after every step;
    ``epoch_end(epoch, optimizer)`` after every epoch, before its checkpoint. ``first_epoch``
    offsets the data order so each stage sees fresh permutations."""
    section = run.config[stage] if section is None else section
    elbo = AnalyticKL_ELBO(bnn, guide, num_particles=section["num_particles"])
    locations, scales = list(guide.loc_parameters()), list(guide.scale_parameters())
    groups = [{"params": locations, "lr": section["lr"]}]
    if scales:
        groups.append({"params": scales, "lr": section["lr_scale"], "weight_decay": 0.0})
    others = [p for p in bnn.parameters() if p.requires_grad]
    if others:
        groups.append({"params": others, "lr": section["lr"]})
    optimizer = make_optimizer(groups, section)
    steps_per_epoch = len(run.loader("train"))
    schedule = make_lr_schedule(optimizer, section, steps_per_epoch)
    start = restore_training(resume, "elbo", elbo, optimizer, schedule)
    kl_weight = _kl_weight(section, steps_per_epoch, schedule)
    guide_update = getattr(guide, "after_step", None)
    timed_epochs(
        run,
        stage,
        start,
        step=elbo_step(elbo, run.dataset_size, kl_weight),
        after_step=(lambda: guide_update(optimizer)) if guide_update is not None else None,
        module=elbo,
        optimizer=optimizer,
        schedule=schedule,
        batches_for_epoch=lambda e: run.loader("train", first_epoch + e),
        epochs=section["epochs"],
        evaluate=lambda: run.evaluate(bnn, guide, run.eval_split, section["eval_samples"]),
        save_states=lambda: {"elbo": elbo.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict()},
        epoch_end=(lambda epoch: epoch_end(epoch, optimizer)) if epoch_end is not None else None,
    )
    return elbo


def _kl_weight(section: dict, steps_per_epoch: int, schedule) -> Callable[[], float] | None:
    """The KL weight of each step: ``kl_scale`` (a tempered posterior when < 1, as the SSVI
    authors train with 0.01), reached linearly over ``kl_warmup_epochs``; None for the ELBO."""
    scale = section["kl_scale"]  # > 0: validate_config
    warmup_steps = int(section["kl_warmup_epochs"] * steps_per_epoch)
    if warmup_steps > 0:
        return lambda: scale * min(1.0, (schedule.last_epoch + 1) / warmup_steps)
    return (lambda: scale) if scale != 1.0 else None


def load_guide_state(run: FitRun, stage: str, elbo: AnalyticKL_ELBO, state: dict) -> None:
    """``elbo.load_state_dict(state)`` (the guide a stage saved), or a one-line error naming the stage."""
    try:
        elbo.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1].strip()[:160]
        raise UsageError(f"the {stage} guide in {str(run.out)!r} was written by another version of pyro_gbnn ({first}); re-run that stage") from None


def open_run(out_dir: str | Path, data_dir: str | Path | None = None, device: str | torch.device | None = "auto") -> FitRun:
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
        config, out, _load_data(config), False, state["results"], state["outputs"], state["stage_time"], device=run_device
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


def branch_run(base_dir: str | Path, out_dir: str | Path, after_stage: str, overrides: list[str] | tuple[str, ...] = ()) -> dict:
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
        raise UsageError(f"the run in {str(base_dir)!r} has not finished stage {after_stage!r}; finish it before branching")
    kept = base_stages[: base_stages.index(after_stage) + 1]
    config = apply_overrides(state["config"], list(overrides))
    validate_config(config)
    stages = _method(config).stages
    if stages[: len(kept)] != kept:
        raise UsageError(f"method {config['method']!r} runs stages {stages}, which do not begin with {kept}; branch after a stage they share")
    for key in ("results", "outputs", "stage_time", "stage_rng"):
        state[key] = {stage: value for stage, value in state.get(key, {}).items() if stage in kept}
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
        cache_dir=data_cfg.get("cache_dir"),  # absent in runs saved before it existed
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
        raise UsageError(f"model_args {config['model_args']} not accepted by model {config['model']!r}: {err}") from None


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
        raise UsageError(f"data.batch_size {config['data']['batch_size']} (the global batch) does not split over {world} processes; use a multiple of {world}")
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
    tracker = open_tracker(config.get("tracker", "none") if distributed.is_main() else "none", out, config)  # runs saved before trackers existed have none
    try:
        run = FitRun(config, out, data, config["progress"] if progress is None else progress, tracker=tracker, device=device)
        return _run_stages(run, method, net, state)
    finally:
        tracker.close()


def _run_stages(run: FitRun, method, net: nn.Module, state: dict | None) -> dict[str, Any]:
    config = run.config
    if state is not None:
        run.results, run.outputs, run.stage_time = state["results"], state["outputs"], state["stage_time"]
        run.stage_rng = state.get("stage_rng", {})
    for stage in method.stages:
        if stage in run.results:
            continue
        resume_state = state if state is not None and state["stage"] == stage and state["epoch"] > 0 else None
        if state is not None and resume_state is None:
            distributed.set_rng_states(state["rng"])
        method.run_stage(stage, run, net, resume_state)
        if stage not in run.results:
            raise UsageError(f"method {config['method']!r}: stage_{stage} returned without run.finish_stage({stage!r}, ...), so it has no results")
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
    from pyro_gbnn.fit import format_table

    run.tracker.text("stage_table", format_table(metrics))
    return metrics
