"""Mean-field variational inference (Blundell et al. 2015): stage 1 of 2DGBNN and INT8,
SVI from the stage-0 network's weights with the guide of ``bnn.guide`` (any guide class)."""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from pyro_gbnn.bayesian import BayesianNetwork
from pyro_gbnn.elbo import AnalyticKL_ELBO
from pyro_gbnn.methods.deterministic import Deterministic
from pyro_gbnn.registry import build_guide
from pyro_gbnn.stages import FitRun, build_bnn, train_variational

__all__ = ["MeanField", "build_mean_field", "restore_mean_field"]


def build_mean_field(net: nn.Module, config: dict, dataset_size: int) -> tuple[BayesianNetwork, nn.Module]:
    """Stage-1 objects from a (pre-trained) network: the BNN and the guide of ``bnn.guide``
    (mean-field by default; any registered or dotted-path guide class), means = net's weights."""
    bnn = build_bnn(net, config, dataset_size)
    return bnn, build_guide(config["bnn"]["guide"], bnn)


def restore_mean_field(run: FitRun, net: nn.Module) -> tuple[BayesianNetwork, nn.Module, AnalyticKL_ELBO]:
    """The stage-1 BNN, guide and ELBO as they were when stage 1 finished."""
    bnn, guide = build_mean_field(run.pretrained(net), run.config, run.dataset_size)
    elbo = AnalyticKL_ELBO(bnn, guide)
    elbo.load_state_dict(run.outputs["mean_field"]["elbo"])
    return bnn, guide, elbo


class MeanField(Deterministic):
    """Stage 0 deterministic, stage 1 SVI (config section ``mean_field``)."""

    stages: ClassVar[tuple[str, ...]] = ("deterministic", "mean_field")
    training_stage = "mean_field"
    guide_use = "any"

    def stage_mean_field(self, run: FitRun, net: nn.Module, resume: dict | None) -> None:
        bnn, guide = build_mean_field(run.pretrained(net), run.config, run.dataset_size)
        elbo = train_variational(run, "mean_field", bnn, guide, resume)
        run.finish_stage("mean_field", bnn, guide, elbo, {"elbo": elbo.state_dict()})

    def model_mean_field(self, run: FitRun, net: nn.Module) -> tuple[BayesianNetwork, nn.Module]:
        bnn, guide, _ = restore_mean_field(run, net)
        return bnn, guide
