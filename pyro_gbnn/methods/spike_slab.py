"""Spike-and-slab compression (Saha et al. 2024): SVI from the stage-0 network with a
spike-and-slab guide (section ``spike_slab``), then pruning by posterior inclusion
probability and optional SVI on the kept weights (section ``prune``)."""

from __future__ import annotations

import time

from torch import nn

from pyro_gbnn.bayesian import BayesianNetwork
from pyro_gbnn.elbo import AnalyticKL_ELBO
from pyro_gbnn.guides.spike_slab import PrunedSpikeSlabGuide, SpikeSlabGuide
from pyro_gbnn.methods.deterministic import Deterministic
from pyro_gbnn.stages import FitRun, build_bnn, count_trainable, load_guide_state, train_variational

__all__ = ["SpikeSlab"]


class SpikeSlab(Deterministic):
    """Stage 0 deterministic, ``spike_slab`` SVI, ``prune``; deployed: mean and scale of each
    kept weight plus a one-bit mask per weight."""

    stages = ("deterministic", "spike_slab", "prune")
    training_stage = "spike_slab"
    own_guide = "its own spike-and-slab guide"

    def stage_spike_slab(self, run: FitRun, net: nn.Module, resume: dict | None) -> None:
        bnn, guide = self._guide(run, net)
        elbo = train_variational(run, "spike_slab", bnn, guide, resume)
        phis = sum(shape.numel() for shape in bnn.site_shapes.values())  # one inclusion probability per weight
        n_params = count_trainable(elbo) + phis
        run.finish_stage("spike_slab", bnn, guide, elbo, {"elbo": elbo.state_dict()}, size=(n_params, 4 * n_params))
        run.results["spike_slab"]["sparsity"] = guide.sparsity(run.config["spike_slab"]["prune_threshold"])

    def model_spike_slab(self, run: FitRun, net: nn.Module) -> tuple[BayesianNetwork, SpikeSlabGuide]:
        bnn, guide = self._guide(run, net)
        load_guide_state(run, "spike_slab", AnalyticKL_ELBO(bnn, guide), run.outputs["spike_slab"]["elbo"])
        return bnn, guide

    def stage_prune(self, run: FitRun, net: nn.Module, resume: dict | None) -> None:
        """Keep the weights whose posterior inclusion probability exceeds ``prune_threshold``,
        then, if ``prune.epochs`` > 0, fine-tune the kept weights' mu and sigma (the mask is fixed)."""
        started = time.perf_counter()
        bnn, guide = self.model_spike_slab(run, net)
        threshold = run.config["spike_slab"]["prune_threshold"]
        pruned = guide.prune(threshold)
        run.stage_time["prune"] = run.stage_time.get("prune", 0.0) + time.perf_counter() - started
        output = {}
        if run.config["prune"]["epochs"] > 0:
            output = {"elbo": train_variational(run, "prune", bnn, pruned, resume).state_dict()}
        others = count_trainable(bnn)
        size = (2 * pruned.num_kept() + others, pruned.size_bytes() + 4 * others)
        run.finish_stage("prune", bnn, pruned, bnn, output, size=size)
        run.results["prune"].update(sparsity=guide.sparsity(threshold), n_kept=pruned.num_kept())

    def model_prune(self, run: FitRun, net: nn.Module) -> tuple[BayesianNetwork, PrunedSpikeSlabGuide]:
        bnn, guide = self.model_spike_slab(run, net)
        pruned = guide.prune(run.config["spike_slab"]["prune_threshold"])
        if "elbo" in run.outputs["prune"]:
            load_guide_state(run, "prune", AnalyticKL_ELBO(bnn, pruned), run.outputs["prune"]["elbo"])
        return bnn, pruned

    @staticmethod
    def _guide(run: FitRun, net: nn.Module) -> tuple[BayesianNetwork, SpikeSlabGuide]:
        section = run.config["spike_slab"]
        bnn = build_bnn(run.pretrained(net), run.config, run.dataset_size)
        guide = SpikeSlabGuide(
            bnn,
            prior_inclusion=section["prior_inclusion"],
            init_inclusion=section["init_inclusion"],
            update_rate=section["update_rate"],
        )
        return bnn, guide
