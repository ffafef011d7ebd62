"""Training loops shared by every stage: optimizers, LR schedules, epochs, logging.

A stage is a ``step(x, y) -> StepResult`` function plus an optimizer; :func:`train_epochs`
runs it for whole epochs, evaluates after each, logs JSON lines and hands each finished
epoch to a callback (which writes the checkpoint). The deterministic, mean-field and later
stages train through the same loop; only :func:`elbo_step` knows about the ELBO.
"""

from __future__ import annotations

import bisect
import json
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from pyro_gbnn import distributed
from pyro_gbnn.elbo import AnalyticKL_ELBO
from pyro_gbnn.errors import DivergedError, UsageError

__all__ = [
    "StepResult",
    "JsonLinesLog",
    "make_optimizer",
    "make_lr_schedule",
    "deterministic_step",
    "elbo_step",
    "train_epochs",
]

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("multistep", "cosine", "constant")
PRECISIONS = ("fp32", "bf16", "fp16")
SYNC_EVERY = 50  # steps between the host's reads of the running totals (progress bar, divergence)


class StepResult(NamedTuple):
    """What one optimisation step reports: the loss it minimised (per datum), the logits and
    extra per-datum values to average over the epoch (tensors stay on the device: reading
    them would synchronise it with the host every step)."""

    loss: torch.Tensor
    logits: torch.Tensor
    extra: dict[str, torch.Tensor | float]


class JsonLinesLog:
    """Append-only JSON-lines log; each record is flushed so a killed run keeps its history.
    In a data-parallel run only rank 0 writes."""

    def __init__(self, path: str | Path, tracker: Any = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tracker = tracker  # a pyro_gbnn.tracking.Tracker that gets every record too

    def write(self, record: dict[str, Any]) -> None:
        if not distributed.is_main():
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.tracker is not None:
            self.tracker.record(record)


def make_optimizer(groups: list[dict], section: dict) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov, weight decay) or Adam/AdamW over parameter groups with their own lr."""
    name = section["optimizer"]
    if name == "sgd":
        return torch.optim.SGD(
            groups,
            lr=section["lr"],
            momentum=section["momentum"],
            nesterov=section["nesterov"] and section["momentum"] > 0,
            weight_decay=section["weight_decay"],
        )
    if name in ("adam", "adamw"):
        cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
        return cls(groups, lr=section["lr"], weight_decay=section["weight_decay"])
    raise UsageError(f"unknown optimizer {name!r}; use one of {', '.join(OPTIMIZERS)}")


def make_lr_schedule(
    optimizer: torch.optim.Optimizer, section: dict, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up for ``warmup_epochs``, then multistep decay (``gamma`` at each of
    ``milestones``, in epochs) or a cosine to zero; stepped once per iteration."""
    kind = section["schedule"]
    if kind not in SCHEDULES:
        raise UsageError(f"unknown schedule {kind!r}; use one of {', '.join(SCHEDULES)}")
    warm = int(section["warmup_epochs"] * steps_per_epoch)
    total = max(1, int(section["epochs"] * steps_per_epoch))
    milestones = sorted(int(m * steps_per_epoch) for m in section["milestones"])
    gamma = section["gamma"]

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))
        if kind == "constant":
            return 1.0
        return gamma ** bisect.bisect_right(milestones, step)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def deterministic_step(net: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], StepResult]:
    """Cross-entropy step for stage 0."""

    def step(x: torch.Tensor, y: torch.Tensor) -> StepResult:
        logits = net(x)
        return StepResult(F.cross_entropy(logits, y), logits, {})

    return step


def elbo_step(
    elbo: AnalyticKL_ELBO, dataset_size: int, kl_weight: Callable[[], float] | None = None
) -> Callable[[torch.Tensor, torch.Tensor], StepResult]:
    """Negative ELBO per datum (so learning rates do not depend on the data-set size).

    ``kl_weight()``, if given, scales the KL term at each step (KL warm-up: the objective
    is the ELBO only once it reaches 1).
    """

    def step(x: torch.Tensor, y: torch.Tensor) -> StepResult:
        terms = elbo.terms(x, y)
        beta = 1.0 if kl_weight is None else kl_weight()
        extra: dict[str, torch.Tensor | float] = {
            "nll": -terms.expected_log_likelihood.detach() / dataset_size,
            "kl": terms.kl.detach() / dataset_size,
        }
        if kl_weight is not None:
            extra["kl_weight"] = beta
        loss = beta * terms.kl - terms.expected_log_likelihood
        return StepResult(loss / dataset_size, terms.logits, extra)

    return step


def train_epochs(
    stage: str,
    step: Callable[[torch.Tensor, torch.Tensor], StepResult],
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    batches_for_epoch: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    epochs: int,
    *,
    start_epoch: int = 0,
    evaluate: Callable[[], dict[str, float]] | None = None,
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
    log: JsonLinesLog | None = None,
    progress: bool = True,
    device: torch.device | str = "cpu",
    after_step: Callable[[], None] | None = None,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Train epochs ``start_epoch .. epochs-1``; returns the last epoch's record.

    ``after_step()`` runs after every optimizer step (a guide's closed-form updates).
    ``progress`` shows a bar during each epoch; one line per finished epoch is printed
    either way. ``precision`` (:data:`PRECISIONS`): ``bf16``/``fp16`` run the step under
    autocast (the network's forward and backward in half precision; parameters, the KL
    and the optimizer stay fp32), ``fp16`` with a gradient scaler.

    The epoch's running totals stay on ``device``; the host reads them every
    :data:`SYNC_EVERY` steps (for the bar) and at the end of the epoch, so a GPU is not
    made to wait for the host after every step. A non-finite loss is seen at the next
    such read and raises :class:`DivergedError` before the epoch's checkpoint is
    written, so the last checkpoint stays the last good state.

    In a data-parallel run (:mod:`pyro_gbnn.distributed`) ``batches_for_epoch`` gives this
    rank's shard, the step runs under ``DistributedDataParallel`` (gradients averaged over
    ranks), the epoch's totals are summed over ranks, and only rank 0 prints.
    """
    record: dict[str, Any] = {}
    main = distributed.is_main()
    progress = progress and main
    device = torch.device(device)
    step = distributed.data_parallel(module, step)
    autocast = _autocast(device, precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    for epoch in range(start_epoch, epochs):
        module.train()
        started = time.perf_counter()
        totals = _EpochTotals(device)
        batches = batches_for_epoch(epoch)
        bar = tqdm(batches, desc=f"{stage} {epoch + 1}/{epochs}", disable=not progress, leave=False, dynamic_ncols=True)
        for i, (x, y) in enumerate(bar):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast:
                result = step(x, y)
            totals.add(result, y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(result.loss).backward()
            scaler.step(optimizer)
            scaler.update()
            if after_step is not None:
                after_step()
            schedule.step()
            if (i + 1) % SYNC_EVERY == 0:
                totals.check_finite(stage, epoch)
                bar.set_postfix(loss=f"{totals.mean_loss():.4f}", acc=f"{totals.accuracy():.4f}")
        bar.close()
        totals.check_finite(stage, epoch)
        total_loss, correct, seen, extras = _summed_over_ranks(*totals.read())
        record = {
            "stage": stage,
            "epoch": epoch + 1,
            "loss": total_loss / max(seen, 1),
            "train_accuracy": correct / max(seen, 1),
            **{f"train_{k}": v / max(seen, 1) for k, v in extras.items()},
            "lr": optimizer.param_groups[0]["lr"],
            "train_time_s": time.perf_counter() - started,
        }
        if evaluate is not None:
            record["eval"] = evaluate()
        if log is not None:
            log.write(record)
        shown = {k: round(v, 4) for k, v in record.get("eval", {}).items() if isinstance(v, float)}
        if main:
            tqdm.write(
                f"{stage} epoch {epoch + 1}/{epochs}: loss {record['loss']:.4f} train acc "
                f"{record['train_accuracy']:.4f} eval {shown}"
            )
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, record)
    return record


def _autocast(device: torch.device, precision: str):
    """The autocast context of ``precision`` on ``device`` (disabled for fp32)."""
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


class _EpochTotals:
    """An epoch's loss, correct predictions and extras, summed on the device (float64)."""

    def __init__(self, device: torch.device) -> None:
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.seen = 0
        self.extras: dict[str, torch.Tensor | float] = {}

    def add(self, result: StepResult, y: torch.Tensor) -> None:
        n = y.shape[0]
        self.seen += n
        self.loss += result.loss.detach().double() * n
        self.correct += (result.logits.detach().argmax(-1) == y).sum()
        for key, value in result.extra.items():
            value = value.double() if torch.is_tensor(value) else value
            self.extras[key] = self.extras.get(key, 0.0) + value * n

    def check_finite(self, stage: str, epoch: int) -> None:
        loss = float(self.loss)
        if not math.isfinite(loss):
            raise DivergedError(
                f"{stage}: loss became {loss} in epoch {epoch + 1}; lower the learning rate "
                f"({stage}.lr) or check the data; the last checkpoint is kept"
            )

    def mean_loss(self) -> float:
        return float(self.loss) / max(self.seen, 1)

    def accuracy(self) -> float:
        return int(self.correct) / max(self.seen, 1)

    def read(self) -> tuple[float, int, int, dict[str, float]]:
        return float(self.loss), int(self.correct), self.seen, {k: float(v) for k, v in self.extras.items()}


def _summed_over_ranks(total_loss: float, correct: int, seen: int, extras: dict[str, float]):
    """An epoch's running totals summed over the ranks of a data-parallel run."""
    if not distributed.is_distributed():
        return total_loss, correct, seen, extras
    keys = sorted(extras)
    totals = distributed.all_sum(
        torch.tensor([total_loss, correct, seen, *(extras[k] for k in keys)], dtype=torch.float64)
    )
    return float(totals[0]), int(totals[1]), int(totals[2]), dict(zip(keys, totals[3:].tolist()))
