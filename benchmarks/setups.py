"""The benchmark's configurations: one training step and one 30-sample predictive each.

Every configuration is a :class:`Setup`: ``train_step()`` runs forward, backward and an
optimizer step on one fixed batch; ``predict(num_samples)`` returns the posterior
predictive class probabilities [B, C] of the same batch, averaged over ``num_samples``
weight draws, with the network in eval mode and no autograd. Each library is used the
way its documentation shows, with one exception for comparability: every variational
configuration trains with ``torch.optim.Adam`` on the negative ELBO per datum (the
Pyro-based peers through ``ELBO.differentiable_loss``), so that optimizer overhead is the
same everywhere (TyXe's own ``fit`` uses ``pyro.optim.Adam``, one optimizer per tensor,
which adds ~15 ms a step on ResNet-20).

The model is ResNet-20 (``pyro_gbnn.build_model("resnet20", 10, 3, 32)``) on random
CIFAR-shaped inputs; normalisation layers stay deterministic in every configuration.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

import pyro_gbnn as pg
from pyro_gbnn.elbo import AnalyticKL_ELBO
from pyro_gbnn.guides import site_key
from pyro_gbnn.guides.shared_mixture import SharedMixtureGuide
from pyro_gbnn.guides.sparse_subspace import SparseSubspaceGuide
from pyro_gbnn.methods.gbnn2d import accumulate_gradients
from pyro_gbnn.predict import predict_batch
from pyro_gbnn.sharing.build import SharingSettings, build_sharing_plan

DATASET_SIZE = 50_000
NUM_CLASSES = 10

from catalog import CONFIGS  # noqa: E402,F401  (name -> (kind, description))


@dataclass
class Setup:
    """One configuration, built and ready: call ``train_step()`` and ``predict(30)``."""

    name: str
    train_step: Callable[[], None]
    predict: Callable[[int], torch.Tensor]
    notes: dict = field(default_factory=dict)
    state_bytes: Callable[[], dict] | None = None  # what training keeps between steps, where we can count it


@dataclass
class Batch:
    x: torch.Tensor
    y: torch.Tensor


def make_batch(batch_size: int = 128, seed: int = 0) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    return Batch(torch.randn(batch_size, 3, 32, 32, generator=gen), torch.randint(0, NUM_CLASSES, (batch_size,), generator=gen))


def resnet20(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return pg.build_model("resnet20", NUM_CLASSES, 3, 32)


def _adam(groups) -> torch.optim.Optimizer:
    return torch.optim.Adam(groups, lr=1e-3)


def _optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def _averaged(forward: Callable[[], torch.Tensor], num_samples: int) -> torch.Tensor:
    """Mean softmax over ``num_samples`` calls of ``forward`` (the peers' documented MC loop)."""
    return torch.stack([forward().softmax(-1) for _ in range(num_samples)]).mean(0)


def _eval_no_grad(module: nn.Module, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    module.eval()
    try:
        with torch.no_grad():
            return fn()
    finally:
        module.train()


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def training_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> Callable[[], dict]:
    """Bytes of ``model``'s state_dict (parameters and buffers: for a guide, the posterior) and
    of the optimizer's state (momenta, Adam's moments), counted after warm-up."""
    return lambda: {
        "model_state_bytes": tensor_bytes(model.state_dict().values()),
        "optimizer_state_bytes": tensor_bytes(v for state in optimizer.state.values() for v in state.values()),
    }


# ----- deterministic -----------------------------------------------------------------
def build_deterministic(batch: Batch, **_) -> Setup:
    net = resnet20()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)

    def train_step() -> None:
        _optimizer_step(optimizer, F.cross_entropy(net(batch.x), batch.y))

    def predict(num_samples: int) -> torch.Tensor:
        return _eval_no_grad(net, lambda: _averaged(lambda: net(batch.x), num_samples))

    return Setup("deterministic", train_step, predict, state_bytes=training_state_bytes(net, optimizer))


# ----- ours ----------------------------------------------------------------------------
def _variational_setup(name: str, bnn: pg.BayesianNetwork, guide: nn.Module, locs, scales, batch: Batch, **notes) -> Setup:
    """Training exactly as ``pyro_gbnn.train.elbo_step`` + the pipeline's parameter groups."""
    elbo = AnalyticKL_ELBO(bnn, guide)
    groups = [{"params": list(locs)}, {"params": list(scales), "lr": 1e-2}]
    others = [p for p in bnn.parameters() if p.requires_grad]
    if others:
        groups.append({"params": others})
    optimizer = _adam(groups)
    after_step = getattr(guide, "after_step", None)

    def train_step() -> None:
        _optimizer_step(optimizer, elbo(batch.x, batch.y) / DATASET_SIZE)
        if after_step is not None:
            after_step(optimizer)

    def predict(num_samples: int) -> torch.Tensor:
        return _eval_no_grad(bnn, lambda: predict_batch(bnn, guide, batch.x, num_samples=num_samples).mean(0))

    return Setup(name, train_step, predict, notes, training_state_bytes(guide, optimizer))


def our_bnn(estimator: str) -> pg.BayesianNetwork:
    return pg.BayesianNetwork(resnet20(), pg.IIDNormalPrior(0.0, 1.0), pg.Categorical(DATASET_SIZE), estimator=estimator)


def build_mean_field(batch: Batch, estimator: str = "weight", name: str = "mean_field", **_) -> Setup:
    bnn = our_bnn(estimator)
    guide = pg.MeanFieldGuide(bnn)
    return _variational_setup(name, bnn, guide, guide.loc_parameters(), guide.scale_parameters(), batch, estimator=estimator)


def trained_looking_guide(bnn: pg.BayesianNetwork, seed: int = 1) -> pg.MeanFieldGuide:
    """A mean-field guide at the network's weights with scales spread like a trained one's
    (three levels, 1e-2 to 6e-2, with 10% jitter; as in tests/test_shared_mixture.py)."""
    guide = pg.MeanFieldGuide(bnn, init_scale=0.05)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, shape in guide.site_shapes.items():
            level = torch.tensor([0.01, 0.03, 0.06])[torch.randint(0, 3, shape, generator=gen)]
            scale = level * (1 + 0.1 * torch.randn(shape, generator=gen)).abs()
            guide.rho[site_key(name)].copy_(scale + torch.log(-torch.expm1(-scale)))
    return guide


def sharing_plan_for(bnn: pg.BayesianNetwork, batch: Batch, settings: SharingSettings):
    """Stage 2 as the pipeline runs it: gradient magnitudes over two batches, then the plan."""
    guide = trained_looking_guide(bnn)
    elbo = AnalyticKL_ELBO(bnn, guide)
    gradients = accumulate_gradients(elbo, guide, [(batch.x, batch.y)] * 2, 2, DATASET_SIZE)
    return build_sharing_plan(guide.posterior_moments(), gradients, settings)


def save_plan(path: str, batch: Batch, sharing: dict | None = None) -> None:
    """Build the ResNet-20 sharing plan once and save it (``SharingPlan.to_state``) to ``path``."""
    pyro.set_rng_seed(0)
    plan = sharing_plan_for(our_bnn("local"), batch, SharingSettings(**(sharing or {})))
    torch.save(plan.to_state(), path)


def build_gbnn(batch: Batch, semantics: str = "tied", name: str = "gbnn_tied", plan_path: str | None = None,
               sharing: dict | None = None, **_) -> Setup:
    """2DGBNN fine-tuning (stage 3): parameter groups as ``TwoDGBNN.stage_fine_tune`` (``pyro_gbnn.stages.train_variational``).

    The plan comes from ``plan_path`` (see :func:`save_plan`) or is built here."""
    from pyro_gbnn.sharing.plan import SharingPlan

    bnn = our_bnn("local")
    settings = SharingSettings(**(sharing or {}))
    if plan_path is not None:
        plan = SharingPlan.from_state(torch.load(plan_path, weights_only=True))
    else:
        plan = sharing_plan_for(bnn, batch, settings)
    guide = SharedMixtureGuide(bnn, plan, semantics=semantics)
    location_names = ("centre_mu", "outlier_loc")
    locs = [getattr(guide, n) for n in location_names]
    scales = [p for n, p in guide.named_parameters() if n not in location_names]
    return _variational_setup(
        name, bnn, guide, locs, scales, batch,
        estimator="local", semantics=semantics, num_components=plan.num_components,
        n_outliers=int(plan.outlier_index.numel()), n_ellipses=int(plan.ellipse_index.numel()),
        sharing_settings=vars(settings),
    )


def build_ssvi(batch: Batch, density: float = 0.1, name: str = "ssvi_d10", **_) -> Setup:
    """SSVI as ``configs/cifar10_resnet20_ssvi.yaml`` trains it (local reparameterization, gradient
    addition every 100 steps): one step in 100 also computes the dense gradient and updates the subspace."""
    bnn = our_bnn("local")
    guide = SparseSubspaceGuide(bnn, density, update_every=100, total_steps=10**6)
    return _variational_setup(name, bnn, guide, guide.loc_parameters(), guide.scale_parameters(), batch,
                              estimator="local", density=guide.density(), train_macs_ratio=guide.train_macs_ratio(bnn, (1, 3, 32, 32)))


# ----- TyXe ----------------------------------------------------------------------------
def _tyxe_shim() -> None:
    """TyXe 0.0.2 calls ``pyro.util.deep_getattr``, which Pyro 1.9 removed; restore it."""
    import pyro.util

    if not hasattr(pyro.util, "deep_getattr"):
        pyro.util.deep_getattr = lambda obj, name: functools.reduce(getattr, name.split("."), obj)


def build_tyxe(batch: Batch, local_reparameterization: bool = False, name: str = "tyxe", **_) -> Setup:
    import contextlib

    import tyxe
    from pyro.infer import TraceMeanField_ELBO

    _tyxe_shim()
    net = resnet20()
    prior = tyxe.priors.IIDPrior(dist.Normal(0.0, 1.0), expose_all=False, hide_module_types=(nn.BatchNorm2d,))
    guide_builder = functools.partial(
        tyxe.guides.AutoNormal, init_loc_fn=tyxe.guides.PretrainedInitializer.from_net(net), init_scale=1e-4
    )
    bnn = tyxe.VariationalBNN(net, prior, tyxe.likelihoods.Categorical(DATASET_SIZE), guide_builder)
    handler = tyxe.poutine.local_reparameterization if local_reparameterization else contextlib.nullcontext
    loss_fn = TraceMeanField_ELBO().differentiable_loss
    with handler():
        bnn.guide(batch.x)  # AutoNormal builds its parameters on the first call
    optimizer = _adam(bnn.parameters())

    def train_step() -> None:
        with handler():
            loss = loss_fn(bnn.model, bnn.guide, batch.x, batch.y) / DATASET_SIZE
        _optimizer_step(optimizer, loss)

    def predict(num_samples: int) -> torch.Tensor:
        # VariationalBNN.predict returns the log of the averaged class probabilities. It runs
        # without the reparameterization handler: the predictive of the same guide.
        return _eval_no_grad(bnn, lambda: bnn.predict(batch.x, num_predictions=num_samples).exp())

    return Setup(name, train_step, predict, {
        "shim": "pyro.util.deep_getattr restored (removed in Pyro 1.9)",
        "predict": "VariationalBNN.predict, weight sampling (no reparameterization handler)",
    })


# ----- bayesian-torch ------------------------------------------------------------------
def build_bayesian_torch(batch: Batch, kind: str = "Reparameterization", name: str = "bt_reparam", **_) -> Setup:
    from bayesian_torch.models.dnn_to_bnn import dnn_to_bnn, get_kl_loss

    net = resnet20()
    dnn_to_bnn(net, {
        "prior_mu": 0.0, "prior_sigma": 1.0, "posterior_mu_init": 0.0, "posterior_rho_init": -3.0,
        "type": kind, "moped_enable": True, "moped_delta": 0.5,
    })
    optimizer = _adam(net.parameters())

    def train_step() -> None:
        logits = net(batch.x)
        _optimizer_step(optimizer, F.cross_entropy(logits, batch.y) + get_kl_loss(net) / DATASET_SIZE)

    def predict(num_samples: int) -> torch.Tensor:
        return _eval_no_grad(net, lambda: _averaged(lambda: net(batch.x), num_samples))

    return Setup(name, train_step, predict, {"type": kind})


# ----- plain Pyro ------------------------------------------------------------------------
def build_pyro_autonormal(batch: Batch, **_) -> Setup:
    from pyro.infer import Predictive, Trace_ELBO
    from pyro.infer.autoguide import AutoNormal
    from pyro.nn import PyroSample
    from pyro.nn.module import to_pyro_module_

    net = resnet20()
    to_pyro_module_(net)
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            continue
        for pname, param in list(module.named_parameters(recurse=False)):
            setattr(module, pname, PyroSample(dist.Normal(0.0, 1.0).expand(param.shape).to_event(param.dim())))

    def model(x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        logits = pyro.deterministic("logits", net(x))
        with pyro.plate("data", DATASET_SIZE, subsample=torch.arange(x.shape[0])):
            return pyro.sample("y", dist.Categorical(logits=logits), obs=y)

    guide = AutoNormal(model, init_scale=1e-4)
    guide(batch.x, batch.y)
    optimizer = _adam(list(guide.parameters()) + list(net.parameters()))
    loss_fn = Trace_ELBO().differentiable_loss

    def train_step() -> None:
        _optimizer_step(optimizer, loss_fn(model, guide, batch.x, batch.y) / DATASET_SIZE)

    def predict(num_samples: int) -> torch.Tensor:
        predictive = Predictive(model, guide=guide, num_samples=num_samples, return_sites=("logits",))
        logits = _eval_no_grad(net, lambda: predictive(batch.x)["logits"])
        return logits.reshape(num_samples, *logits.shape[-2:]).softmax(-1).mean(0)

    return Setup("pyro_autonormal", train_step, predict, {"predictive": "pyro.infer.Predictive(parallel=False)"})


BUILDERS: dict[str, Callable[..., Setup]] = {
    "deterministic": build_deterministic,
    "mean_field": functools.partial(build_mean_field, estimator="weight", name="mean_field"),
    "mean_field_lrt": functools.partial(build_mean_field, estimator="local", name="mean_field_lrt"),
    "mean_field_flipout": functools.partial(build_mean_field, estimator="flipout", name="mean_field_flipout"),
    "gbnn_tied": functools.partial(build_gbnn, semantics="tied", name="gbnn_tied"),
    "gbnn_independent": functools.partial(build_gbnn, semantics="independent", name="gbnn_independent"),
    "gbnn_hierarchical": functools.partial(build_gbnn, semantics="hierarchical", name="gbnn_hierarchical"),
    "ssvi_d100": functools.partial(build_ssvi, density=1.0, name="ssvi_d100"),
    "ssvi_d10": functools.partial(build_ssvi, density=0.1, name="ssvi_d10"),
    "ssvi_d05": functools.partial(build_ssvi, density=0.05, name="ssvi_d05"),
    "tyxe": functools.partial(build_tyxe, local_reparameterization=False, name="tyxe"),
    "tyxe_lrt": functools.partial(build_tyxe, local_reparameterization=True, name="tyxe_lrt"),
    "bt_reparam": functools.partial(build_bayesian_torch, kind="Reparameterization", name="bt_reparam"),
    "bt_flipout": functools.partial(build_bayesian_torch, kind="Flipout", name="bt_flipout"),
    "pyro_autonormal": build_pyro_autonormal,
}


def build(name: str, batch: Batch, **options) -> Setup:
    """Build configuration ``name`` (one of :data:`CONFIGS`) on ``batch``."""
    if name not in BUILDERS:
        raise ValueError(f"unknown configuration {name!r}; use some of {', '.join(CONFIGS)}")
    pyro.set_rng_seed(0)
    return BUILDERS[name](batch, **options)
