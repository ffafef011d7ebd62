"""Deterministic training: the baseline, and stage 0 of every method that starts from a
pre-trained network (SGD with the paper's schedules, appendix I.3), or ``init_from``."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from pyro_gbnn.errors import UsageError
from pyro_gbnn.methods.base import Method
from pyro_gbnn.stages import FitRun, restore_training, timed_epochs
from pyro_gbnn.train import deterministic_step, make_lr_schedule, make_optimizer

__all__ = ["Deterministic", "load_pretrained"]


def load_pretrained(net: nn.Module, path: str | Path) -> None:
    """Weights for stage 0 from a pyro_gbnn checkpoint or a plain ``state_dict`` file."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(
            f"--init-from {str(path)!r} does not exist; pass a checkpoint.pt of a finished stage 0 or a state_dict file"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UsageError(
            f"--init-from {str(path)!r} is not a readable torch file ({type(err).__name__}); pass a checkpoint.pt or "
            "a state_dict"
        ) from None
    if isinstance(state, dict) and "outputs" in state:
        if "deterministic" not in state["outputs"]:
            raise UsageError(f"checkpoint {str(path)!r} has no finished deterministic stage to start from")
        state = state["outputs"]["deterministic"]["net"]
    try:
        net.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as err:
        first = str(err).strip().splitlines()[0][:160]
        raise UsageError(f"--init-from {str(path)!r} does not fit the model: {first}") from None


class Deterministic(Method):
    """Point-estimate training of the network (config section ``deterministic``)."""

    stages: ClassVar[tuple[str, ...]] = ("deterministic",)
    training_stage = "deterministic"

    def stage_deterministic(self, run: FitRun, net: nn.Module, resume: dict | None) -> None:
        section = run.config["deterministic"]
        if run.config["init_from"]:
            load_pretrained(net, run.config["init_from"])
            run.finish_stage("deterministic", net, None, net, {"net": net.state_dict()}, epochs=0)
            run.results["deterministic"]["init_from"] = str(run.config["init_from"])
            return
        optimizer = make_optimizer([{"params": list(net.parameters())}], section)
        schedule = make_lr_schedule(optimizer, section, len(run.loader("train")))
        start = restore_training(resume, "net", net, optimizer, schedule)
        timed_epochs(
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
            save_states=lambda: {
                "net": net.state_dict(),
                "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(),
            },
        )
        run.finish_stage("deterministic", net, None, net, {"net": net.state_dict()})

    def model_deterministic(self, run: FitRun, net: nn.Module) -> tuple[nn.Module, None]:
        return run.pretrained(net), None
