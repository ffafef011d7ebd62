"""SSVI (Li et al. 2024): variational inference in a sparse subspace of fixed dimension,
trained from the network's initial weights (section ``ssvi``); deployed: mean and scale
of each active weight plus a one-bit mask per weight."""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from pyro_gbnn.bayesian import BayesianNetwork
from pyro_gbnn.elbo import AnalyticKL_ELBO
from pyro_gbnn.guides.sparse_subspace import SparseSubspaceGuide
from pyro_gbnn.methods.base import Method
from pyro_gbnn.stages import FitRun, build_bnn, count_trainable, load_guide_state, train_variational

__all__ = ["SSVI"]


class SSVI(Method):
    """One stage, ``ssvi``: only the active subspace is ever trained."""

    stages: ClassVar[tuple[str, ...]] = ("ssvi",)
    training_stage = "ssvi"
    own_guide = "its own sparse-subspace guide"

    def stage_ssvi(self, run: FitRun, net: nn.Module, resume: dict | None) -> None:
        bnn, guide = self._guide(run, net)
        elbo = train_variational(run, "ssvi", bnn, guide, resume)
        others = count_trainable(bnn)
        size = (2 * guide.num_active() + others, guide.size_bytes() + 4 * others)
        run.finish_stage("ssvi", bnn, guide, elbo, {"elbo": elbo.state_dict()}, size=size)
        x, _ = run.data.test[0]
        run.results["ssvi"].update(density=guide.density(), train_macs_ratio=guide.train_macs_ratio(bnn, (1, *x.shape)))

    def model_ssvi(self, run: FitRun, net: nn.Module) -> tuple[BayesianNetwork, SparseSubspaceGuide]:
        bnn, guide = self._guide(run, net)
        load_guide_state(run, "ssvi", AnalyticKL_ELBO(bnn, guide), run.outputs["ssvi"]["elbo"])
        return bnn, guide

    @staticmethod
    def _guide(run: FitRun, net: nn.Module) -> tuple[BayesianNetwork, SparseSubspaceGuide]:
        section = run.config["ssvi"]
        bnn = build_bnn(net, run.config, run.dataset_size)
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
            sparse_kernel_max_density=section["sparse_kernel_max_density"],
        )
        return bnn, guide
