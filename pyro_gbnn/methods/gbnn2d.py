"""2DGBNN (stochastic weight sharing): mean-field stages 0-1, then stage 2 ``sharing``
(outliers, 2D Gaussian mixture, dissolving, merging, alpha-blending: the plan) and stage 3
``fine_tune`` (SVI with the shared-mixture guide: the bounded ELBO of paper Eq. 10 under the
``hierarchical`` and ``independent`` semantics, the exact ELBO of the tied model under ``tied``)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from pyro_gbnn import distributed
from pyro_gbnn.bayesian import BayesianNetwork
from pyro_gbnn.checkpoint import atomic_write_bytes
from pyro_gbnn.elbo import AnalyticKL_ELBO
from pyro_gbnn.errors import UsageError
from pyro_gbnn.guides import MeanFieldGuide
from pyro_gbnn.guides.shared_mixture import SharedMixtureGuide
from pyro_gbnn.methods.mean_field import MeanField, restore_mean_field
from pyro_gbnn.sharing.build import SharingSettings, build_sharing_plan
from pyro_gbnn.sharing.plan import SharingPlan
from pyro_gbnn.stages import FitRun, build_bnn, count_trainable, load_guide_state, train_variational

__all__ = ["TwoDGBNN", "accumulate_gradients", "sharing_metrics"]


def accumulate_gradients(
    elbo: AnalyticKL_ELBO,
    guide: MeanFieldGuide,
    batches,
    num_batches: int,
    dataset_size: int,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """Mean |d(-ELBO per datum) / d loc| of every weight over ``num_batches`` batches (section 4.1),
    summed on the guide's device; in a data-parallel run each rank takes ``num_batches`` of
    its shard and the means are averaged."""
    totals = {name: torch.zeros_like(guide.location(name), requires_grad=False) for name in guide.site_shapes}
    seen = 0
    for x, y in batches:
        if seen == num_batches:
            break
        elbo.zero_grad(set_to_none=True)
        (elbo(x.to(device, non_blocking=True), y.to(device, non_blocking=True)) / dataset_size).backward()
        for name in totals:
            totals[name] += guide.location(name).grad.detach().abs()
        seen += 1
    elbo.zero_grad(set_to_none=True)
    world = distributed.world_size()
    return {name: distributed.all_sum(total / max(seen, 1)) / world for name, total in totals.items()}


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


def _sharing_settings(config: dict) -> SharingSettings:
    """Stage 2's settings from the ``sharing`` section (less ``grad_batches``) and the run's seed."""
    section = {k: v for k, v in config["sharing"].items() if k != "grad_batches"}
    return SharingSettings.from_dict(section | {"seed": config["seed"]})


class TwoDGBNN(MeanField):
    """Stages 0-1 as mean-field, then ``sharing`` (config section ``sharing``) and
    ``fine_tune`` (section ``fine_tune``: semantics, shared prior, KL weighting, merging)."""

    stages = ("deterministic", "mean_field", "sharing", "fine_tune")
    training_stage = "fine_tune"
    guide_use = "mean_field"

    def check_config(self, config: dict) -> None:
        """Also refuses merging during fine-tuning where the merge tests would read values
        that never train: under ``tied`` with the weight prior a centre's std coordinate
        and its covariance's std axis do not reach the objective, so re-testing would judge
        fine-tuned means against stage 2's std coordinates."""
        super().check_config(config)
        _sharing_settings(config).check()
        section = config["fine_tune"]
        if section["merge_every"] and (section["semantics"], section["shared_prior"]) == ("tied", "weight"):
            raise UsageError(
                "fine_tune.merge_every re-tests merges on trained components, but under semantics tied with "
                "shared_prior weight their std coordinates never train; use semantics hierarchical or independent, "
                "shared_prior anchor, or merge_every 0"
            )

    def stage_sharing(self, run: FitRun, net: nn.Module, resume: dict | None) -> None:
        section = run.config["sharing"]
        started = time.perf_counter()
        bnn, guide, elbo = restore_mean_field(run, net)  # a mean-field guide: check_config saw to it
        epoch_after_stage1 = run.config["mean_field"]["epochs"]
        gradients = accumulate_gradients(
            elbo, guide, run.loader("train", epoch_after_stage1), section["grad_batches"], run.dataset_size, run.device
        )
        plan = build_sharing_plan(guide.posterior_moments(), gradients, _sharing_settings(run.config), distributed=True)
        if distributed.is_main():
            atomic_write_bytes(run.out / "sharing_plan.pt", lambda handle: torch.save(plan.to_state(), handle))
        shared = self._shared_guide(run, bnn, plan)
        run.stage_time["sharing"] = time.perf_counter() - started
        self._finish_shared_stage(run, "sharing", bnn, shared, {"plan": plan.to_state(), "bnn": bnn.state_dict()})
        run.results["sharing"]["report"] = {k: v for k, v in plan.report.items() if k != "settings"}

    def model_sharing(self, run: FitRun, net: nn.Module) -> tuple[BayesianNetwork, SharedMixtureGuide]:
        bnn = build_bnn(run.pretrained(net), run.config, run.dataset_size)
        bnn.load_state_dict(run.outputs["sharing"]["bnn"])
        return bnn, self._shared_guide(run, bnn, SharingPlan.from_state(run.outputs["sharing"]["plan"]))

    def stage_fine_tune(self, run: FitRun, net: nn.Module, resume: dict | None) -> None:
        bnn, guide = self.model_sharing(run, net)
        first_epoch = run.config["mean_field"]["epochs"] + 1
        elbo = train_variational(run, "fine_tune", bnn, guide, resume, first_epoch, self._merge_every(run, guide))
        self._finish_shared_stage(run, "fine_tune", bnn, guide, {"elbo": elbo.state_dict()})

    def model_fine_tune(self, run: FitRun, net: nn.Module) -> tuple[BayesianNetwork, SharedMixtureGuide]:
        bnn, guide = self.model_sharing(run, net)
        load_guide_state(run, "fine_tune", AnalyticKL_ELBO(bnn, guide), run.outputs["fine_tune"]["elbo"])
        return bnn, guide

    @staticmethod
    def _shared_guide(run: FitRun, bnn: BayesianNetwork, plan: SharingPlan) -> SharedMixtureGuide:
        section = run.config["fine_tune"]
        return SharedMixtureGuide(
            bnn,
            plan,
            semantics=section["semantics"],
            prior=section["shared_prior"],
            kl_weighting=section["kl_weighting"],
        )

    @staticmethod
    def _finish_shared_stage(
        run: FitRun, stage: str, bnn: BayesianNetwork, guide: SharedMixtureGuide, output: dict
    ) -> None:
        """Metrics and sizes of the plan as the guide stands (merging may have retired components):
        ``size_bytes`` is what deployment stores, the fp32 values (``size_bytes_values``) and the
        index and blend tables (``size_bytes_index``), as the other methods count masks."""
        n_params = guide.num_trainable_values() + count_trainable(bnn)
        plan = guide.plan()
        values, index = 4 * n_params, plan.index_bytes()
        run.finish_stage(stage, bnn, guide, bnn, output, size=(n_params, values + index))
        run.results[stage].update(sharing_metrics(plan), size_bytes_values=values, size_bytes_index=index)

    @staticmethod
    def _merge_every(run: FitRun, guide: SharedMixtureGuide) -> Callable[[int, torch.optim.Optimizer], None] | None:
        """``fine_tune.merge_every`` > 0: stage 2's merge tests re-run on the trained components
        after every that many epochs (not after the last), as the authors' code does."""
        every, epochs = run.config["fine_tune"]["merge_every"], run.config["fine_tune"]["epochs"]
        if not every:
            return None
        settings = _sharing_settings(run.config)

        def merge(epoch: int, optimizer: torch.optim.Optimizer) -> None:
            if epoch % every or epoch == epochs:
                return
            retired = guide.merge_close_components(optimizer, settings)
            run.log.write(
                {"stage": "fine_tune", "epoch": epoch, "merged": retired, "n_gaussians": int(guide.alive.sum())}
            )

        return merge
