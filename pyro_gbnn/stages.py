"""What a method's stages are written with: the run they report to (:class:`FitRun`),
network construction, the variational training loop, timed and checkpointed epochs,
restoring a killed stage and loading a saved guide.

The methods (:mod:`pyro_gbnn.methods`) build on this module; the run layer
(:mod:`pyro_gbnn.pipeline`: ``run_fit``, ``open_run``, ``branch_run``) drives them. Nothing
here imports either.

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
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Subset

from pyro_gbnn import distributed
from pyro_gbnn.batchnorm import batchnorm_layers, per_draw_batchnorm_bytes
from pyro_gbnn.bayesian import BayesianNetwork
from pyro_gbnn.checkpoint import save_checkpoint
from pyro_gbnn.data import DataSplits, evaluation_seed, make_loader, posterior_draws_seed, set_loader_epoch
from pyro_gbnn.devices import resolve_device
from pyro_gbnn.elbo import AnalyticKL_ELBO
from pyro_gbnn.errors import UsageError
from pyro_gbnn.likelihoods import Categorical
from pyro_gbnn.metrics import classification_metrics, mean_and_spread
from pyro_gbnn.predict import FixedDraws, fixed_draws, predict
from pyro_gbnn.registry import build_prior
from pyro_gbnn.tracking import Tracker
from pyro_gbnn.train import JsonLinesLog, elbo_step, make_lr_schedule, make_optimizer, train_epochs

__all__ = [
    "FitRun",
    "build_bnn",
    "count_trainable",
    "load_guide_state",
    "restore_training",
    "timed_epochs",
    "train_variational",
]


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

    def evaluate(
        self, bnn: nn.Module, guide: nn.Module | None, split: str, num_samples: int, repeat: int = 0
    ) -> dict[str, float]:
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
        loader = make_loader(
            shard,
            size,
            shuffle=False,
            num_workers=self.config["data"]["num_workers"],
            pin_memory=self.device.type == "cuda",
        )
        base = self.config["seed"] if repeat == 0 else posterior_draws_seed(self.config["seed"], repeat)
        seeds = [evaluation_seed(base, b) for b in mine]
        prediction = predict(
            bnn,
            guide,
            loader,
            num_samples=num_samples,
            sample_chunk=pred_cfg["sample_chunk"],
            seeds=seeds,
            draws=self.fixed_draws(bnn, guide, num_samples, repeat),
        )
        probs, labels = _gathered_batches(mine, prediction.probs, prediction.labels, size)
        return classification_metrics(probs, labels, n_bins=pred_cfg["ece_bins"])

    def fixed_draws(
        self, bnn: nn.Module, guide: nn.Module | None, num_samples: int, repeat: int = 0
    ) -> FixedDraws | None:
        """Under ``predict.batchnorm: per_draw`` (for a guide over a network with BatchNorm):
        ``num_samples`` draws seeded by (run seed, ``repeat``), each with its BatchNorm
        statistics re-estimated on ``predict.batchnorm_batches`` training batches (the same
        seeded batches on every rank); else None (running statistics)."""
        if not self.per_draw_batchnorm(bnn, guide):
            return None
        return fixed_draws(
            bnn, guide, num_samples, self.batchnorm_batches(repeat), posterior_draws_seed(self.config["seed"], repeat)
        )

    def per_draw_batchnorm(self, bnn: nn.Module, guide: nn.Module | None) -> bool:
        """Whether predictions of this model use per-draw BatchNorm statistics: ``predict.batchnorm:
        per_draw``, a guide, and BatchNorm layers in the network."""
        return self.config["predict"]["batchnorm"] == "per_draw" and guide is not None and bool(batchnorm_layers(bnn))

    def batchnorm_batches(self, repeat: int = 0) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        """The ``predict.batchnorm_batches`` training batches (seeded by (run seed, ``repeat``),
        the same on every rank and each time they are iterated) that re-estimate each draw's statistics."""
        seed = posterior_draws_seed(self.config["seed"], repeat)
        loader = make_loader(
            self.data.train,
            self.config["data"]["batch_size"],
            shuffle=True,
            seed=seed,
            num_workers=self.config["data"]["num_workers"],
            pin_memory=self.device.type == "cuda",
        )
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
        # A stage's wall time includes its test evaluation.
        self.stage_time[stage] = self.stage_time.get(stage, 0.0) + time.perf_counter() - started
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


def _gathered_batches(
    mine: list[int], probs: torch.Tensor, labels: torch.Tensor, size: int
) -> tuple[torch.Tensor, torch.Tensor]:
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

    train_epochs(
        stage,
        start_epoch=start_epoch,
        on_epoch_end=on_epoch_end,
        log=run.log,
        progress=run.progress,
        device=run.device,
        precision=run.config["precision"],
        **kwargs,
    )
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
        save_states=lambda: {
            "elbo": elbo.state_dict(),
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
        },
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
        raise UsageError(
            f"the {stage} guide in {str(run.out)!r} was written by another version of pyro_gbnn ({first}); re-run "
            "that stage"
        ) from None
