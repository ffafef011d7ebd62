"""The staged training pipeline behind ``python -m pyro_gbnn.fit`` and the notebooks.

Stages run in order (e.g. for 2DGBNN: stage 0 ``deterministic``, stage 1 ``mean_field``,
stage 2 ``sharing``, stage 3 ``fine_tune``; see :data:`STAGES`); each finished
epoch and each finished stage is written to ``OUT/checkpoint.pt`` atomically, with every
random-number state, so ``resume=True`` continues a killed run and reaches the same
result as an uninterrupted one. ``OUT`` also receives ``config.yaml``, ``log.jsonl`` and,
at the end, ``metrics.json``.

Size accounting (``n_params_trainable``, ``size_bytes``): every value the optimizer
updates (``requires_grad``), counted once (for a mean-field BNN: a mean and a scale per
Bayesian weight plus the deterministic normalisation parameters; for 2DGBNN only the
component values its semantics trains); ``size_bytes`` = 4 bytes per such value (fp32).
Buffers (BatchNorm running statistics) are not counted. Compressed stages count
what they deploy instead: spike-and-slab the kept weights, SSVI the active ones, INT8 the
packed codes (each stage's code says how).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pyro
import torch
from torch import nn
from torch.utils.data import Subset

from pyro_gbnn.bayesian import BayesianNetwork
from pyro_gbnn.checkpoint import atomic_write_bytes, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from pyro_gbnn.config import METHODS, dump_config
from pyro_gbnn.data import DataSplits, load_dataset, make_loader
from pyro_gbnn.elbo import AnalyticKL_ELBO
from pyro_gbnn.errors import UsageError
from pyro_gbnn.guides import MeanFieldGuide
from pyro_gbnn.guides.shared_mixture import SharedMixtureGuide
from pyro_gbnn.guides.sparse_subspace import SparseSubspaceGuide
from pyro_gbnn.guides.spike_slab import PrunedSpikeSlabGuide, SpikeSlabGuide
from pyro_gbnn.likelihoods import Categorical
from pyro_gbnn.metrics import classification_metrics
from pyro_gbnn.models import build_model
from pyro_gbnn.predict import predict
from pyro_gbnn.quantization import quantize_mean_field
from pyro_gbnn.tracking import Tracker, open_tracker
from pyro_gbnn.validation import validate_config
from pyro_gbnn.registry import build_guide, build_prior
from pyro_gbnn.sharing.build import SharingSettings, build_sharing_plan
from pyro_gbnn.sharing.plan import SharingPlan
from pyro_gbnn.train import (
    JsonLinesLog,
    deterministic_step,
    elbo_step,
    make_lr_schedule,
    make_optimizer,
    train_epochs,
)

__all__ = ["STAGES", "TRAINING_STAGE", "run_fit", "load_run_model", "open_run", "model_after_stage", "count_trainable", "build_bnn", "build_mean_field", "accumulate_gradients", "FitRun"]

STAGES: dict[str, tuple[str, ...]] = {
    "deterministic": ("deterministic",),
    "mean-field": ("deterministic", "mean_field"),
    "2dgbnn": ("deterministic", "mean_field", "sharing", "fine_tune"),
    "spike-slab": ("deterministic", "spike_slab", "prune"),
    "ssvi": ("ssvi",),
    "int8": ("deterministic", "mean_field", "quantize"),
}

TRAINING_STAGE = {  # the stage whose epochs ``--epochs`` sets
    "deterministic": "deterministic",
    "mean-field": "mean_field",
    "2dgbnn": "fine_tune",
    "spike-slab": "spike_slab",
    "ssvi": "ssvi",
    "int8": "mean_field",
}


FINAL_KEYS = (
    "accuracy", "nll", "ece", "brier", "n_params_trainable", "size_bytes",
    "n_outliers", "n_ellipses", "n_gaussians", "n_params_paper", "size_bytes_values", "size_bytes_index",
    "sparsity", "density", "train_flops_ratio", "scale_bits",
)


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


def build_mean_field(net: nn.Module, config: dict, dataset_size: int) -> tuple[BayesianNetwork, nn.Module]:
    """Stage-1 objects from a (pre-trained) network: the BNN and the guide of ``bnn.guide``
    (mean-field by default; any registered or dotted-path guide class), means = net's weights."""
    bnn = build_bnn(net, config, dataset_size)
    return bnn, build_guide(config["bnn"]["guide"], bnn)


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

    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"

    @property
    def log(self) -> JsonLinesLog:
        return JsonLinesLog(self.out / "log.jsonl", self.tracker)

    def loader(self, split: str, epoch: int = 0):
        data_cfg = self.config["data"]
        dataset = getattr(self.data, split)
        train = split == "train"
        return make_loader(
            dataset,
            data_cfg["batch_size"] if train else data_cfg["eval_batch_size"],
            shuffle=train,
            seed=self.config["seed"],
            epoch=epoch,
            num_workers=data_cfg["num_workers"],
        )

    @property
    def eval_split(self) -> str:
        return "val" if self.data.val is not None else "test"

    def save(self, stage: str, epoch: int, states: dict[str, Any]) -> None:
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
                "rng": rng_state(),
            },
        )

    def evaluate(self, bnn: nn.Module, guide: nn.Module | None, split: str, num_samples: int) -> dict[str, float]:
        pred_cfg = self.config["predict"]
        prediction = predict(
            bnn, guide, self.loader(split), num_samples=num_samples, sample_chunk=pred_cfg["sample_chunk"]
        )
        return classification_metrics(prediction.probs, prediction.labels, n_bins=pred_cfg["ece_bins"])

    def finish_stage(
        self,
        stage: str,
        bnn: nn.Module,
        guide: nn.Module | None,
        trained: nn.Module,
        output: dict,
        size: tuple[int, int] | None = None,
    ) -> None:
        """Test metrics and size of a finished stage; ``size`` = (parameters, bytes) of
        what the stage deploys, default: every trainable value of ``trained`` in fp32."""
        num_samples = 1 if guide is None else self.config["predict"]["num_samples"]
        started = time.perf_counter()
        metrics = self.evaluate(bnn, guide, "test", num_samples)
        self.stage_time[stage] = self.stage_time.get(stage, 0.0) + time.perf_counter() - started  # wall time includes the test evaluation
        n_params = count_trainable(trained)
        n_params, size_bytes = (n_params, 4 * n_params) if size is None else size
        self.results[stage] = {
            **metrics,
            "n_params_trainable": n_params,
            "size_bytes": size_bytes,
            "epochs": self.config.get(stage, {}).get("epochs", 0),
            "wall_time_s": round(self.stage_time.get(stage, 0.0), 2),
        }
        self.outputs[stage] = output
        self.log.write({"stage": stage, "finished": True, "test": self.results[stage]})


def _timed_epochs(run: FitRun, stage: str, start_epoch: int, **kwargs) -> None:
    """train_epochs with the stage's wall time accumulated across resumes and checkpoints each epoch."""
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

    train_epochs(stage, start_epoch=start_epoch, on_epoch_end=on_epoch_end, log=run.log, progress=run.progress, device=run.config["device"], **kwargs)
    run.stage_time[stage] = run.stage_time.get(stage, 0.0) + time.perf_counter() - clock[0]


def _restore_training(resume: dict | None, key: str, module: nn.Module, optimizer, schedule) -> int:
    """Load a mid-stage checkpoint into the stage's objects; returns the epoch to start at."""
    if resume is None:
        return 0
    module.load_state_dict(resume["states"][key])
    optimizer.load_state_dict(resume["states"]["optimizer"])
    schedule.load_state_dict(resume["states"]["schedule"])
    set_rng_state(resume["rng"])
    return resume["epoch"]


def load_pretrained(net: nn.Module, path: str | Path) -> None:
    """Weights for stage 0 from a pyro_gbnn checkpoint or a plain ``state_dict`` file."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--init-from {str(path)!r} does not exist; pass a checkpoint.pt of a finished stage 0 or a state_dict file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UsageError(f"--init-from {str(path)!r} is not a readable torch file ({type(err).__name__}); pass a checkpoint.pt or a state_dict") from None
    if isinstance(state, dict) and "outputs" in state:
        if "deterministic" not in state["outputs"]:
            raise UsageError(f"checkpoint {str(path)!r} has no finished deterministic stage to start from")
        state = state["outputs"]["deterministic"]["net"]
    try:
        net.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as err:
        first = str(err).strip().splitlines()[0][:160]
        raise UsageError(f"--init-from {str(path)!r} does not fit the model: {first}") from None


def _stage_deterministic(run: FitRun, net: nn.Module, resume: dict | None) -> None:
    section = run.config["deterministic"]
    if run.config["init_from"]:
        load_pretrained(net, run.config["init_from"])
        run.finish_stage("deterministic", net, None, net, {"net": net.state_dict()})
        run.results["deterministic"].update(epochs=0, init_from=str(run.config["init_from"]))
        return
    optimizer = make_optimizer([{"params": list(net.parameters())}], section)
    steps = len(run.loader("train"))
    schedule = make_lr_schedule(optimizer, section, steps)
    start = _restore_training(resume, "net", net, optimizer, schedule)
    _timed_epochs(
        run,
        "deterministic",
        start,
        step=deterministic_step(net),
        module=net,
        optimizer=optimizer,
        schedule=schedule,
        batches_for_epoch=lambda e: run.loader("train", e),
        epochs=section["epochs"],
        evaluate=lambda: run.evaluate(net, None, run.eval_split, 1),
        save_states=lambda: {"net": net.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict()},
    )
    run.finish_stage("deterministic", net, None, net, {"net": net.state_dict()})


def _train_variational(
    run: FitRun,
    stage: str,
    bnn: BayesianNetwork,
    guide: nn.Module,
    resume: dict | None,
    first_epoch: int = 0,
    epoch_end: Callable[[int, torch.optim.Optimizer], None] | None = None,
) -> AnalyticKL_ELBO:
    """SVI on the ELBO for ``config[stage]`` epochs: means at ``lr``, scale-like parameters
    at ``lr_scale`` (appendix I.4; the guide's ``loc_parameters()`` and
    ``scale_parameters()``), the network's deterministic parameters at ``lr``. The KL
    weight rises linearly to ``kl_scale`` (1: the ELBO) over ``kl_warmup_epochs``; a guide's ``after_step(optimizer)``
    runs after every step; ``epoch_end(epoch, optimizer)`` after every epoch, before its
    checkpoint. ``first_epoch`` offsets the data order so each stage sees fresh
    permutations."""
    section = run.config[stage]
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
    start = _restore_training(resume, "elbo", elbo, optimizer, schedule)
    kl_weight = _kl_weight(section, steps_per_epoch, schedule)
    guide_update = getattr(guide, "after_step", None)
    _timed_epochs(
        run,
        stage,
        start,
        step=elbo_step(elbo, len(run.data.train), kl_weight),
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


def _stage_mean_field(run: FitRun, net: nn.Module, resume: dict | None) -> None:
    net.load_state_dict(run.outputs["deterministic"]["net"])
    bnn, guide = build_mean_field(net, run.config, len(run.data.train))
    elbo = _train_variational(run, "mean_field", bnn, guide, resume)
    run.finish_stage("mean_field", bnn, guide, elbo, {"elbo": elbo.state_dict()})


def _restore_mean_field(run: FitRun, net: nn.Module) -> tuple[BayesianNetwork, MeanFieldGuide, AnalyticKL_ELBO]:
    """The stage-1 BNN, guide and ELBO as they were when stage 1 finished."""
    net.load_state_dict(run.outputs["deterministic"]["net"])
    bnn, guide = build_mean_field(net, run.config, len(run.data.train))
    elbo = AnalyticKL_ELBO(bnn, guide)
    elbo.load_state_dict(run.outputs["mean_field"]["elbo"])
    return bnn, guide, elbo


def open_run(out_dir: str | Path, data_dir: str | Path | None = None) -> FitRun:
    """A run folder's config, data, results and stage outputs, read once (``data_dir``: where
    the data are now, if they moved); :func:`model_after_stage` rebuilds its models."""
    out = Path(out_dir)
    state = load_checkpoint(out / "checkpoint.pt")
    config = state["config"]
    if data_dir is not None:
        config["data"]["dir"] = str(data_dir)
    return FitRun(config, out, _load_data(config), False, state["results"], state["outputs"], state["stage_time"])


def model_after_stage(run: FitRun, stage: str | None = None) -> tuple[nn.Module, nn.Module | None]:
    """The model of ``run`` after ``stage`` (default: its last), ready to predict: (network, guide).

    The network is the deterministic one after ``deterministic`` (guide None), else the
    ``BayesianNetwork``; the guide is the one the stage evaluated (for ``quantize``, the
    quantized guide at the first of ``int8.scale_bits``; for ``sharing``, the stage-2
    guide before fine-tuning).
    """
    config, out = run.config, run.out
    stage = stage or STAGES[config["method"]][-1]
    if stage not in run.results:
        raise UsageError(f"the run in {str(out)!r} has not finished stage {stage!r}; resume it with --resume first")
    net = _build_net(config, run.data).to(config["device"])
    if stage != "ssvi":
        net.load_state_dict(run.outputs["deterministic"]["net"])
    if stage == "deterministic":
        return net, None
    if stage in ("mean_field", "quantize"):
        bnn, guide, _ = _restore_mean_field(run, net)
        if stage == "quantize":
            section = config["int8"]
            guide = quantize_mean_field(guide, section["loc_bits"], int(section["scale_bits"][0]), section["per_channel"])
        return bnn, guide
    if stage == "spike_slab":
        bnn, guide = _spike_slab_guide(run, net)
        _load_guide_state(run, stage, AnalyticKL_ELBO(bnn, guide), run.outputs[stage]["elbo"])
        return bnn, guide
    if stage == "prune":
        bnn, _, pruned = _pruned_guide(run, net)
        if "elbo" in run.outputs["prune"]:
            _load_guide_state(run, stage, AnalyticKL_ELBO(bnn, pruned), run.outputs[stage]["elbo"])
        return bnn, pruned
    if stage == "ssvi":
        bnn, guide = _ssvi_guide(run, net)
        _load_guide_state(run, stage, AnalyticKL_ELBO(bnn, guide), run.outputs[stage]["elbo"])
        return bnn, guide
    bnn = build_bnn(net, config, len(run.data.train))
    bnn.load_state_dict(run.outputs["sharing"]["bnn"])
    guide = _shared_guide(run, bnn, SharingPlan.from_state(run.outputs["sharing"]["plan"]))
    if stage == "fine_tune":
        _load_guide_state(run, stage, AnalyticKL_ELBO(bnn, guide), run.outputs[stage]["elbo"])
    return bnn, guide


def _load_guide_state(run: FitRun, stage: str, elbo: AnalyticKL_ELBO, state: dict) -> None:
    try:
        elbo.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1].strip()[:160]
        raise UsageError(f"the {stage} guide in {str(run.out)!r} was written by another version of pyro_gbnn ({first}); re-run that stage") from None


def load_run_model(
    out_dir: str | Path, data_dir: str | Path | None = None, stage: str | None = None
) -> tuple[FitRun, nn.Module, nn.Module | None]:
    """(run, network, guide) of a run folder after ``stage`` (default: its last):
    :func:`open_run` then :func:`model_after_stage`."""
    run = open_run(out_dir, data_dir)
    return (run, *model_after_stage(run, stage))


def accumulate_gradients(
    elbo: AnalyticKL_ELBO, guide: MeanFieldGuide, batches, num_batches: int, dataset_size: int, device="cpu"
) -> dict[str, torch.Tensor]:
    """Mean |d(-ELBO per datum) / d loc| of every weight over ``num_batches`` batches (section 4.1)."""
    totals = {name: torch.zeros(shape) for name, shape in guide.site_shapes.items()}
    seen = 0
    for x, y in batches:
        if seen == num_batches:
            break
        elbo.zero_grad(set_to_none=True)
        (elbo(x.to(device), y.to(device)) / dataset_size).backward()
        for name in totals:
            totals[name] += guide.location(name).grad.detach().abs().cpu()
        seen += 1
    elbo.zero_grad(set_to_none=True)
    return {name: total / max(seen, 1) for name, total in totals.items()}


def sharing_metrics(plan: SharingPlan) -> dict[str, int]:
    """The plan's counts, and the parameter count as the paper's tables give it
    (outliers + ellipses + 2 x Gaussians), to read our rows beside the paper's."""
    outliers, ellipses = int(plan.outlier_index.numel()), int(plan.ellipse_index.numel())
    return {
        "n_outliers": outliers,
        "n_ellipses": ellipses,
        "n_gaussians": plan.num_components,
        "n_params_paper": outliers + ellipses + 2 * plan.num_components,
    }


def _shared_guide(run: FitRun, bnn: BayesianNetwork, plan: SharingPlan) -> SharedMixtureGuide:
    section = run.config["fine_tune"]
    return SharedMixtureGuide(
        bnn, plan, semantics=section["semantics"], prior=section["shared_prior"], kl_weighting=section["kl_weighting"]
    )


def _finish_shared_stage(run: FitRun, stage: str, bnn, guide: SharedMixtureGuide, output: dict) -> None:
    """Metrics and sizes of the plan as the guide stands (merging may have retired components):
    ``size_bytes`` is what deployment stores, the fp32 values (``size_bytes_values``) and the
    index and blend tables (``size_bytes_index``), as the other methods count masks."""
    n_params = guide.num_trainable_values() + count_trainable(bnn)
    plan = guide.plan()
    values, index = 4 * n_params, plan.index_bytes()
    run.finish_stage(stage, bnn, guide, bnn, output, size=(n_params, values + index))
    result = run.results[stage]
    result.update(sharing_metrics(plan), size_bytes_values=values, size_bytes_index=index)


def _sharing_settings(run: FitRun) -> SharingSettings:
    """Stage 2's settings from the ``sharing`` section (less ``grad_batches``) and the run's seed."""
    section = {k: v for k, v in run.config["sharing"].items() if k != "grad_batches"}
    return SharingSettings.from_dict(section | {"seed": run.config["seed"]})


def _merge_every(run: FitRun, guide: SharedMixtureGuide) -> Callable[[int, torch.optim.Optimizer], None] | None:
    """``fine_tune.merge_every`` > 0: stage 2's merge tests re-run on the trained components
    after every that many epochs (not after the last), as the authors' code does."""
    every, epochs = run.config["fine_tune"].get("merge_every", 0), run.config["fine_tune"]["epochs"]  # absent in older runs
    if not every:
        return None
    settings = _sharing_settings(run)

    def merge(epoch: int, optimizer: torch.optim.Optimizer) -> None:
        if epoch % every or epoch == epochs:
            return
        retired = guide.merge_close_components(optimizer, settings)
        run.log.write({"stage": "fine_tune", "epoch": epoch, "merged": retired, "n_gaussians": int(guide.alive.sum())})

    return merge


def _stage_sharing(run: FitRun, net: nn.Module, resume: dict | None) -> None:
    section = run.config["sharing"]
    started = time.perf_counter()
    bnn, guide, elbo = _restore_mean_field(run, net)  # a mean-field guide: validate_config checked bnn.guide
    epoch_after_stage1 = run.config["mean_field"]["epochs"]
    gradients = accumulate_gradients(
        elbo, guide, run.loader("train", epoch_after_stage1), section["grad_batches"], len(run.data.train), run.config["device"]
    )
    plan = build_sharing_plan(guide.posterior_moments(), gradients, _sharing_settings(run))
    atomic_write_bytes(run.out / "sharing_plan.pt", lambda handle: torch.save(plan.to_state(), handle))
    shared = _shared_guide(run, bnn, plan)
    run.stage_time["sharing"] = time.perf_counter() - started
    _finish_shared_stage(run, "sharing", bnn, shared, {"plan": plan.to_state(), "bnn": bnn.state_dict()})
    run.results["sharing"]["report"] = {k: v for k, v in plan.report.items() if k != "settings"}


def _stage_fine_tune(run: FitRun, net: nn.Module, resume: dict | None) -> None:
    net.load_state_dict(run.outputs["deterministic"]["net"])
    bnn = build_bnn(net, run.config, len(run.data.train))
    bnn.load_state_dict(run.outputs["sharing"]["bnn"])
    plan = SharingPlan.from_state(run.outputs["sharing"]["plan"])
    guide = _shared_guide(run, bnn, plan)
    first_epoch = run.config["mean_field"]["epochs"] + 1
    elbo = _train_variational(run, "fine_tune", bnn, guide, resume, first_epoch, _merge_every(run, guide))
    _finish_shared_stage(run, "fine_tune", bnn, guide, {"elbo": elbo.state_dict()})


def _spike_slab_guide(run: FitRun, net: nn.Module) -> tuple[BayesianNetwork, SpikeSlabGuide]:
    section = run.config["spike_slab"]
    net.load_state_dict(run.outputs["deterministic"]["net"])
    bnn = build_bnn(net, run.config, len(run.data.train))
    guide = SpikeSlabGuide(
        bnn,
        prior_inclusion=section["prior_inclusion"],
        init_inclusion=section["init_inclusion"],
        update_rate=section["update_rate"],
    )
    return bnn, guide


def _stage_spike_slab(run: FitRun, net: nn.Module, resume: dict | None) -> None:
    bnn, guide = _spike_slab_guide(run, net)
    elbo = _train_variational(run, "spike_slab", bnn, guide, resume)
    n_params = count_trainable(elbo) + sum(shape.numel() for shape in bnn.site_shapes.values())  # + one phi per weight
    run.finish_stage("spike_slab", bnn, guide, elbo, {"elbo": elbo.state_dict()}, size=(n_params, 4 * n_params))
    run.results["spike_slab"]["sparsity"] = guide.sparsity(run.config["spike_slab"]["prune_threshold"])


def _pruned_guide(run: FitRun, net: nn.Module) -> tuple[BayesianNetwork, SpikeSlabGuide, PrunedSpikeSlabGuide]:
    """(network, trained spike-and-slab guide, its pruned guide before pruned fine-tuning)."""
    bnn, guide = _spike_slab_guide(run, net)
    AnalyticKL_ELBO(bnn, guide).load_state_dict(run.outputs["spike_slab"]["elbo"])
    return bnn, guide, guide.prune(run.config["spike_slab"]["prune_threshold"])


def _stage_prune(run: FitRun, net: nn.Module, resume: dict | None) -> None:
    """Keep the weights whose posterior inclusion probability exceeds ``prune_threshold``,
    then, if ``prune.epochs`` > 0, fine-tune the kept weights' mu and sigma (the mask is
    fixed). Deployed: mean and scale of each kept weight plus a one-bit mask per weight."""
    started = time.perf_counter()
    bnn, guide, pruned = _pruned_guide(run, net)
    threshold = run.config["spike_slab"]["prune_threshold"]
    run.stage_time["prune"] = run.stage_time.get("prune", 0.0) + time.perf_counter() - started
    output = {}
    if run.config["prune"]["epochs"] > 0:
        output = {"elbo": _train_variational(run, "prune", bnn, pruned, resume).state_dict()}
    others = count_trainable(bnn)
    size = (2 * pruned.num_kept() + others, pruned.size_bytes() + 4 * others)
    run.finish_stage("prune", bnn, pruned, bnn, output, size=size)
    run.results["prune"].update(sparsity=guide.sparsity(threshold), n_kept=pruned.num_kept())


def _ssvi_guide(run: FitRun, net: nn.Module) -> tuple[BayesianNetwork, SparseSubspaceGuide]:
    section = run.config["ssvi"]
    bnn = build_bnn(net, run.config, len(run.data.train))
    steps = int(section["update_fraction"] * section["epochs"] * len(run.loader("train")))
    guide = SparseSubspaceGuide(
        bnn,
        density=section["density"],
        removal=section["removal"],
        addition=section["addition"],
        update_every=section["update_every"],
        replacement_rate=section["replacement_rate"],
        total_steps=steps,
        seed=run.config["seed"],
    )
    return bnn, guide


def _stage_ssvi(run: FitRun, net: nn.Module, resume: dict | None) -> None:
    """SSVI from the network's initial weights: only the active subspace is ever trained."""
    bnn, guide = _ssvi_guide(run, net)
    elbo = _train_variational(run, "ssvi", bnn, guide, resume)
    others = count_trainable(bnn)
    size = (2 * guide.num_active() + others, guide.size_bytes() + 4 * others)
    run.finish_stage("ssvi", bnn, guide, elbo, {"elbo": elbo.state_dict()}, size=size)
    x, _ = run.data.test[0]
    run.results["ssvi"].update(
        density=guide.density(), train_flops_ratio=guide.training_flops_ratio(bnn, (1, *x.shape))
    )


def _stage_quantize(run: FitRun, net: nn.Module, resume: dict | None) -> None:
    """Post-training quantization of the stage-1 guide, one evaluation per scale bit width;
    deployed: the packed codes and their fp32 scales plus the fp32 normalisation parameters."""
    section = run.config["int8"]
    bnn, guide, _ = _restore_mean_field(run, net)  # a mean-field guide: validate_config checked bnn.guide
    others = count_trainable(bnn)
    n_params = count_trainable(guide) + others
    rows = {}
    for bits in section["scale_bits"]:
        started = time.perf_counter()
        quantized = quantize_mean_field(guide, loc_bits=section["loc_bits"], scale_bits=int(bits), per_channel=section["per_channel"])
        metrics = run.evaluate(bnn, quantized, "test", run.config["predict"]["num_samples"])
        rows[str(bits)] = {**metrics, "size_bytes": quantized.size_bytes() + 4 * others, "wall_time_s": round(time.perf_counter() - started, 2)}
    first = str(section["scale_bits"][0])
    run.results["quantize"] = {
        **rows[first],
        "n_params_trainable": n_params,
        "scale_bits": int(first),
        "loc_bits": section["loc_bits"],
        "by_scale_bits": rows,
    }
    run.outputs["quantize"] = {}
    run.log.write({"stage": "quantize", "finished": True, "test": run.results["quantize"]})


STAGE_RUNNERS = {
    "deterministic": _stage_deterministic,
    "mean_field": _stage_mean_field,
    "sharing": _stage_sharing,
    "fine_tune": _stage_fine_tune,
    "spike_slab": _stage_spike_slab,
    "prune": _stage_prune,
    "ssvi": _stage_ssvi,
    "quantize": _stage_quantize,
}


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
) -> dict[str, Any]:
    """Run (or resume) every stage of ``config["method"]``; returns the contents of metrics.json.

    On resume the saved config is used; ``data_dir`` may point to the data's new place.
    Runs with ``torch.use_deterministic_algorithms`` on (restored afterwards): the
    shared-mixture guide's gathers back-propagate through scatter-adds whose default CPU
    kernels sum in a thread-dependent order, and a resumed run must match exactly.
    """
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        return _run_fit(config, out_dir, resume, progress, data_dir)
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def _run_fit(config, out_dir, resume, progress, data_dir) -> dict[str, Any]:
    if config["method"] not in STAGES:
        raise UsageError(f"unknown method {config['method']!r}; use one of {', '.join(METHODS)}")
    out = Path(out_dir)
    checkpoint = out / "checkpoint.pt"
    state = None
    if resume:
        state = load_checkpoint(checkpoint)
        config = state["config"]
        if data_dir is not None:
            config["data"]["dir"] = str(data_dir)
    elif checkpoint.exists() or (out / "metrics.json").exists():
        raise UsageError(f"{str(out)!r} already holds a run; pass --resume to continue it or choose another --out")
    validate_config(config)
    if config["threads"]:
        torch.set_num_threads(int(config["threads"]))
    pyro.set_rng_seed(config["seed"])
    data = _load_data(config)
    net = _build_net(config, data).to(config["device"])
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        atomic_write_bytes(out / "config.yaml", lambda h: h.write(dump_config(config).encode()))
    tracker = open_tracker(config.get("tracker", "none"), out, config)  # runs saved before trackers existed have none
    try:
        return _run_stages(config, out, data, net, state, tracker, progress)
    finally:
        tracker.close()


def _run_stages(config, out, data, net, state, tracker, progress) -> dict[str, Any]:
    run = FitRun(config, out, data, config["progress"] if progress is None else progress, tracker=tracker)
    if state is not None:
        run.results, run.outputs, run.stage_time = state["results"], state["outputs"], state["stage_time"]
        run.stage_rng = state.get("stage_rng", {})
    for stage in STAGES[config["method"]]:
        if stage in run.results:
            continue
        resume_state = state if state is not None and state["stage"] == stage and state["epoch"] > 0 else None
        if state is not None and resume_state is None:
            set_rng_state(state["rng"])
        STAGE_RUNNERS[stage](run, net, resume_state)
        run.stage_rng[stage] = rng_state()  # a later run can branch off after this stage exactly
        run.save(stage, config.get(stage, {}).get("epochs", 0), {})
        state = None
    final = run.results[STAGES[config["method"]][-1]]
    metrics = {
        **{k: final[k] for k in FINAL_KEYS if k in final},
        "dataset": config["dataset"],
        "model": config["model"],
        "method": config["method"],
        "stages": run.results,
    }
    atomic_write_bytes(out / "metrics.json", lambda h: h.write(json.dumps(metrics, indent=2).encode()))
    from pyro_gbnn.fit import format_table

    tracker.text("stage_table", format_table(metrics))
    return metrics
