"""Sparse Subspace Variational Inference (SSVI; Li, Miao, Qiu & Zhang, ICLR 2024, *Training
Bayesian Neural Networks with Sparse Subspace Variational Inference*, arXiv:2402.11025).

q(theta) lives on a sparse subspace of fixed dimension s = round(density * D), D the number of
Bayesian weights: an active weight has N(mu, sigma^2), sigma = softplus(rho); an inactive one
is exactly 0 (a point mass, no KL). Every M = ``update_every`` optimizer steps the k lowest-
scoring active weights of each site are removed and k inactive ones added, so s stays fixed.
Only the paper's abstract was available to us: the details follow the authors' code
(github.com/ljb121002/SSVI, ``rigl_torch/RigL.py``, ``train_cifar.py``); differences are noted.

* ``removal``, with z = |mu| / sigma: ``"abs_mean"`` |mu|; ``"mean_abs"`` the folded-normal mean
  E|theta| = sigma sqrt(2/pi) exp(-z^2/2) + |mu| erf(z/sqrt 2); ``"snr_abs"`` (the code's
  default) E|theta| / sd|theta|, Var|theta| = mu^2 + sigma^2 - E|theta|^2. We evaluate it as
  (z + d) / sqrt(1 - 2zd - d^2), d = sqrt(2/pi) exp(-z^2/2) - z erfc(z/sqrt 2), in float64: no
  cancellation (the code's float32 form degrades for large z and scores its NaNs 0). It
  increases strictly with z, so it ranks weights like |mu| / sigma.
* ``addition``: ``"gradient"`` takes the inactive entries with the largest |d loss / d w| of the
  last backward pass before the update (RigL's rule, the code's only one); ``"random"``, uniform.
  ``forward`` hooks the location tensor mu * mask, like the code's gradient of its (unmasked)
  mean: with ``estimator="weight"`` that is d loss / d w at the drawn w = loc + sigma eps; with
  ``"local"`` (the code's choice) and ``"flipout"``, the gradient through the mean path, i.e.
  with respect to the weight's mean. Just-removed entries are not re-added in the same update
  (the code, like RigL, may).
* Schedule: k_l = round(r_t s_l) for site l, r_t = r_0 / 2 (1 + cos(pi t / T)), at steps t = M,
  2M, ... while t < T. The code: r_0 = 0.3, M = 100, T = 0.75 x the training iterations, and it
  skips the optimizer step of an update step (here ``after_step`` follows the optimizer step).
* Initialisation: a random mask per site; means from ``bnn.initial_values`` (the code trains from
  scratch, mu ~ N(0, 0.01^2)). Added entries get mu = 0 and, for ``added_scale="mean"`` (the
  code's default), rho = the mean rho of the site's remaining active entries; ``"initial"``
  gives the site's initial scale (the mean of its ``init_scale`` draws).
* Budget: uniform density per site (the code's ``'uniform'``), rounded by largest remainder so
  the total is exactly s. The code keeps the first convolution dense and biases deterministic;
  ``dense_sites`` keeps sites fully active and spreads the rest of s over the others.
* KL warm-up (the pipeline's KL weight): the code scales the KL by 0.01 x min(2e / E, 1) in epoch
  e = 1..E, a linear ramp over the first half of training.

Storage is the subspace only: per site, ``index`` (int32 flat positions of the active weights,
a buffer) and the parameters ``loc`` and ``rho`` of those weights, s_l values each, so the
parameters, their gradients and the optimizer's state are O(density x D). An update rewrites
the slots of the removed weights with the added ones (new position, mu = 0, the added rho) and
zeroes the optimizer state of those slots (each state tensor shaped like the parameter: Adam's
moments, SGD's momentum), so they restart from rest; slots are then re-sorted by position.
The dense weight exists only where a dense kernel needs it: q of a site is a
:class:`~pyro_gbnn.sparse.SparseNormal`, whose ``loc`` and ``scale`` are the active values
scattered into zeros of the weight's shape (the convolutions of local reparameterization and
flipout read them) and whose draws add noise drawn for the active entries only: exactly 0 off
the subspace. Its log-density is not finite there: train with
:class:`~pyro_gbnn.elbo.AnalyticKL_ELBO`, which uses :meth:`SparseSubspaceGuide.kl_divergence`
(over the s active values), not with Pyro's Monte-Carlo ELBOs. A state_dict of the earlier dense
layout (``masks``, dense ``loc`` / ``rho``) still loads, as slots in flat-index order.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

from pyro_gbnn import distributed
from pyro_gbnn.bayesian import BayesianNetwork
from pyro_gbnn.guides.base import (
    BufferDict,
    SiteGuide,
    network_device,
    normal_kl,
    normal_prior,
    optimizer_state,
    site_key,
    zero_optimizer_state,
)
from pyro_gbnn.guides.mean_field import initial_scales, inverse_softplus
from pyro_gbnn.sparse import SparseNormal

__all__ = ["SparseSubspaceGuide", "SparseNormal", "removal_score", "REMOVAL_CRITERIA", "ADDITION_RULES"]

REMOVAL_CRITERIA = ("abs_mean", "snr_abs", "mean_abs")
ADDITION_RULES = ("gradient", "random")
ADDED_SCALES = ("mean", "initial")


def removal_score(mu: torch.Tensor, sigma: torch.Tensor, criterion: str) -> torch.Tensor:
    """Importance of each weight under q = N(mu, sigma^2) (higher = keep); float64, same shape."""
    mu, sigma = mu.double().abs(), sigma.double().clamp_min(torch.finfo(torch.float64).tiny)
    if criterion == "abs_mean":
        return mu
    z = mu / sigma
    if criterion == "mean_abs":
        return sigma * math.sqrt(2 / math.pi) * torch.exp(-0.5 * z * z) + mu * torch.erf(z / math.sqrt(2))
    if criterion == "snr_abs":
        d = math.sqrt(2 / math.pi) * torch.exp(-0.5 * z * z) - z * torch.erfc(z / math.sqrt(2))
        return (z + d) / torch.sqrt(1 - 2 * z * d - d * d)
    raise ValueError(f"removal criterion {criterion!r} is unknown; use one of {REMOVAL_CRITERIA}")


def _check_fraction(arg: str, value, zero_allowed: bool) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not (0 <= value <= 1) or (value == 0 and not zero_allowed):
        raise ValueError(f"{arg} must be a number in {'[' if zero_allowed else '('}0, 1], got {value!r}")


class SparseSubspaceGuide(SiteGuide):
    """Mean-field Normal on an adaptive sparse subspace of exactly round(density * D) weights.

    Args:
        bnn: the network; every site's prior must be a Normal.
        density: fraction of Bayesian weights that are active, in (0, 1].
        removal: ``"abs_mean"``, ``"snr_abs"`` or ``"mean_abs"`` (module docstring).
        addition: ``"gradient"`` or ``"random"``.
        update_every: M, optimizer steps between subspace updates.
        replacement_rate: r_0 in [0, 1], the fraction of each site's active set replaced at t = 0.
        total_steps: T of the cosine schedule; no updates from step T on.
        init_scale, xavier_gain: initial scales, as :func:`~pyro_gbnn.guides.mean_field.initial_scales`.
        added_scale: ``"mean"`` or ``"initial"``, the scale of newly added weights.
        dense_sites: sites kept fully active (e.g. the first convolution).
        seed: the random mask and random additions (update t uses seed and t: resumes exactly).
        sparse_kernel_max_density: Linear weights whose density is at most this multiply by
            their active entries alone (:func:`pyro_gbnn.sparse.sparse_linear`, a CSR product)
            except at steps that need the dense gradient; 0 keeps every layer dense.

    ``budget[name]`` is the number of active weights of each site; ``step_count`` (a buffer)
    the optimizer steps seen. The active positions (``index``), their means and scales and the
    counter are in the state_dict; nothing of the guide has the size of the dense network.
    """

    def __init__(
        self,
        bnn: BayesianNetwork,
        density: float,
        removal: str = "snr_abs",
        addition: str = "gradient",
        update_every: int = 100,
        replacement_rate: float = 0.3,
        total_steps: int = 10_000,
        init_scale: float | str = "xavier",
        xavier_gain: float = 0.01,
        added_scale: str = "mean",
        dense_sites: Sequence[str] = (),
        seed: int = 0,
        sparse_kernel_max_density: float = 0.0,
    ) -> None:
        super().__init__(bnn)
        _check_fraction("density", density, zero_allowed=False)
        _check_fraction("replacement_rate", replacement_rate, zero_allowed=True)
        _check_fraction("sparse_kernel_max_density", sparse_kernel_max_density, zero_allowed=True)
        for arg, value, accepted in (
            ("removal", removal, REMOVAL_CRITERIA),
            ("addition", addition, ADDITION_RULES),
            ("added_scale", added_scale, ADDED_SCALES),
        ):
            if value not in accepted:
                raise ValueError(f"{arg} {value!r} is unknown; use one of {accepted}")
        for arg, value, least in (
            ("update_every", update_every, 1),
            ("total_steps", total_steps, 1),
            ("seed", seed, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{arg} must be an integer >= {least}, got {value!r}")
        unknown = [n for n in dense_sites if n not in self.site_shapes]
        if unknown:
            raise ValueError(
                f"dense_sites {unknown} are not Bayesian sites; use names from {list(self.site_shapes)[:5]}"
            )
        priors = {site_key(name): normal_prior(bnn, name, "SparseSubspaceGuide") for name in self.site_shapes}
        self.prior_loc = BufferDict({key: loc for key, (loc, _) in priors.items()}, persistent=False)
        self.prior_scale = BufferDict({key: scale for key, (_, scale) in priors.items()}, persistent=False)
        self.removal, self.addition, self.added_scale = removal, addition, added_scale
        self.update_every, self.replacement_rate, self.total_steps = update_every, float(replacement_rate), total_steps
        self.seed = seed
        self.budget = self._budgets(density, set(dense_sites))
        self.sparse_kernel_sites = {
            name
            for name, shape in self.site_shapes.items()
            if len(shape) == 2
            and isinstance(bnn.module_of(name), nn.Linear)
            and self.budget[name] <= sparse_kernel_max_density * shape.numel()
        }
        generator = torch.Generator().manual_seed(seed)  # the CPU's: the same subspace on any device
        index, scales, device = {}, initial_scales(bnn, init_scale, xavier_gain), network_device(bnn)
        for name, shape in self.site_shapes.items():
            index[site_key(name)] = (
                torch.randperm(shape.numel(), generator=generator)[: self.budget[name]].sort().values.int().to(device)
            )
        self.index = BufferDict(index)
        self.loc = nn.ParameterDict(
            {
                key: nn.Parameter(bnn.initial_values[n].detach().reshape(-1)[index[key]].clone())
                for n, key in zip(self.site_shapes, index)
            }
        )
        self.rho = nn.ParameterDict(
            {
                key: nn.Parameter(inverse_softplus(scales[n]).reshape(-1)[index[key]].clone())
                for n, key in zip(self.site_shapes, index)
            }
        )
        self.register_buffer("initial_rho", torch.stack([inverse_softplus(scales[n].mean()) for n in self.site_shapes]))
        self.register_buffer("step_count", torch.zeros((), dtype=torch.long, device=device))
        self._steps = 0  # step_count on the host, read by every step without waiting for the device
        self.register_load_state_dict_post_hook(lambda module, keys: setattr(module, "_steps", int(module.step_count)))
        self._grads: dict[str, torch.Tensor] = {}

    def _budgets(self, density: float, dense: set[str]) -> dict[str, int]:
        sizes = {n: s.numel() for n, s in self.site_shapes.items()}
        total = round(density * sum(sizes.values()))
        rest = total - sum(sizes[n] for n in dense)
        if total < 1:
            raise ValueError(f"density {density} keeps none of the {sum(sizes.values())} weights; use a larger density")
        if rest < 0:
            raise ValueError(f"density {density} keeps {total} weights, fewer than the {total - rest} of dense_sites")
        sparse = [n for n in sizes if n not in dense]
        quota = {n: rest * sizes[n] / max(sum(sizes[m] for m in sparse), 1) for n in sparse}
        budget = {n: (sizes[n] if n in dense else math.floor(quota[n])) for n in sizes}
        by_remainder = sorted(sparse, key=lambda n: -(quota[n] - budget[n]))
        for n in by_remainder[: total - sum(budget.values())]:
            budget[n] += 1
        return budget

    def distribution(self, name: str, sparse_kernel: bool | None = None) -> dist.Distribution:
        """N(mu, sigma^2) on the active entries, exactly 0 on the others (a :class:`SparseNormal`);
        ``sparse_kernel`` (default: the site is in ``sparse_kernel_sites``) lets its Linear layer
        multiply by the active entries alone."""
        key, shape = site_key(name), self.site_shapes[name]
        sparse_kernel = name in self.sparse_kernel_sites if sparse_kernel is None else sparse_kernel
        q = SparseNormal(self.index[key], self.loc[key], F.softplus(self.rho[key]), shape, sparse_kernel)
        return q.to_event(len(shape))

    def forward(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        capture = self.addition == "gradient" and torch.is_grad_enabled() and self._update_due(self._steps + 1)
        draws = {}
        for name in self.site_shapes:
            # the gradient-addition rule needs the dense gradient: dense kernels on that step
            q = self.distribution(name, sparse_kernel=name in self.sparse_kernel_sites and not capture)
            if capture and q.base_dist.loc.requires_grad:  # every use of the location flows through this tensor
                q.base_dist.loc.register_hook(lambda grad, name=name: self._store_grad(name, grad))
            draws[name] = pyro.sample(name, q)
        return draws

    def _store_grad(self, name: str, grad: torch.Tensor) -> None:
        self._grads[name] = grad.detach() + self._grads[name] if name in self._grads else grad.detach()

    def kl_divergence(self, bnn: BayesianNetwork) -> torch.Tensor:
        """sum over active weights of KL(N(mu, sigma^2) || prior); the Normal priors were read
        from ``bnn`` at construction."""
        total = 0.0
        for key in map(site_key, self.site_shapes):
            index = self.index[key]
            prior_loc, prior_scale = (
                p if p.dim() == 0 else p.reshape(-1)[index] for p in (self.prior_loc[key], self.prior_scale[key])
            )
            total = total + normal_kl(self.loc[key], F.softplus(self.rho[key]), prior_loc, prior_scale).sum()
        return torch.as_tensor(total)

    def loc_parameters(self) -> Iterator[nn.Parameter]:
        return iter(self.loc.values())

    def scale_parameters(self) -> Iterator[nn.Parameter]:
        return iter(self.rho.values())

    def replacement_fraction(self, step: int) -> float:
        """r_t = r_0 / 2 (1 + cos(pi t / T))."""
        return self.replacement_rate / 2 * (1 + math.cos(math.pi * step / self.total_steps))

    def _update_due(self, step: int) -> bool:
        return step % self.update_every == 0 and step < self.total_steps

    @torch.no_grad()
    def after_step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Count the step; every M steps (while t < T) replace round(r_t s_l) weights of each site."""
        self.step_count += 1
        self._steps += 1
        step = self._steps
        grads, self._grads = self._grads, {}
        if not self._update_due(step):
            return
        if self.addition == "gradient" and not grads:
            raise RuntimeError(
                "addition='gradient' needs a backward pass through this guide's forward before "
                "after_step; call loss.backward() each step (or use addition='random')"
            )
        if distributed.is_distributed():  # every rank must grow the same weights: the summed gradient
            grads = {name: distributed.all_sum(grads[name].contiguous()) for name in sorted(grads)}
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        rate = self.replacement_fraction(step)
        for index, name in enumerate(self.site_shapes):
            self._replace(name, index, rate, grads.get(name), generator, optimizer)

    def _replace(
        self,
        name: str,
        index: int,
        rate: float,
        grad: torch.Tensor | None,
        generator: torch.Generator,
        optimizer: torch.optim.Optimizer | None,
    ) -> None:
        key, numel = site_key(name), self.site_shapes[name].numel()
        slots, mu, rho = self.index[key], self.loc[key], self.rho[key]
        k = min(round(rate * self.budget[name]), numel - self.budget[name])
        if k <= 0:
            return
        removed = torch.topk(removal_score(mu, F.softplus(rho), self.removal), k, largest=False).indices
        if self.addition == "gradient":
            growth = (
                grad.reshape(-1).abs().double()
                if grad is not None
                else torch.zeros(numel, dtype=torch.float64, device=slots.device)
            )
        else:
            growth = torch.rand(numel, generator=generator, dtype=torch.float64)
        active = torch.zeros(numel, dtype=torch.bool, device=slots.device)
        active[slots] = True  # the old active set: a weight removed now is not added back at once
        added = torch.topk(growth.to(slots.device).masked_fill(active, -math.inf), k).indices
        survivors = torch.ones_like(mu, dtype=torch.bool)
        survivors[removed] = False
        new_rho = self.initial_rho[index]
        if self.added_scale == "mean":  # the survivors' mean rho, without reading the device
            kept = survivors.sum()
            new_rho = torch.where(kept > 0, (rho * survivors).sum() / kept.clamp_min(1), new_rho)
        slots[removed], mu[removed], rho[removed] = added.to(slots.dtype), 0.0, new_rho
        zero_optimizer_state(optimizer, (mu, rho), removed)
        # Slots stay in flat-index order: the draws (noise in slot order) are then those of any
        # copy of this q that lists its active weights by position, as an exported model does.
        order = slots.argsort()
        for tensor in (slots, mu, rho, *optimizer_state(optimizer, (mu, rho))):
            tensor.copy_(tensor[order])

    def active_mask(self, name: str) -> torch.Tensor:
        """Bool tensor of site ``name``'s shape, True where the weight is active (built on request)."""
        shape = self.site_shapes[name]
        mask = torch.zeros(shape.numel(), dtype=torch.bool, device=self.step_count.device)
        mask[self.index[site_key(name)]] = True
        return mask.view(shape)

    def num_active(self) -> int:
        return sum(self.index[site_key(n)].numel() for n in self.site_shapes)

    def density(self) -> float:
        """Active fraction of the Bayesian weights."""
        return self.num_active() / sum(s.numel() for s in self.site_shapes.values())

    def size_bytes(self) -> int:
        """Deployed storage: fp32 mu and sigma per active weight, plus per site the cheaper
        index: a bitmask (ceil(numel / 8) bytes) or int32 flat indices (4 bytes each)."""
        active = {n: self.index[site_key(n)].numel() for n in self.site_shapes}
        return sum(8 * a + min(math.ceil(self.site_shapes[n].numel() / 8), 4 * a) for n, a in active.items())

    @torch.no_grad()
    def train_macs_ratio(self, bnn: BayesianNetwork, input_shape: Sequence[int]) -> float:
        """Sparse over dense training arithmetic, in theory: sum_l MACs_l density_l / sum_l MACs_l over the
        Linear/Conv2d weights, MACs_l counted by forward hooks on one input of ``input_shape``
        (batch included). Forward and backward MACs of a layer both scale with its density
        (local reparameterization: the mean and the variance pass alike), so the ratio is
        that of the whole training step if every layer ran a sparse kernel; the dense gradient
        of the addition step is left out. What a step costs here is measured by
        ``benchmarks/run.py`` (rows ``ssvi_*``): the convolutions run dense."""
        macs: dict[str, int] = {}

        def count(name: str, per_output: int):
            return lambda module, inputs, out: macs.__setitem__(name, macs.get(name, 0) + out.numel() * per_output)

        hooks = [
            bnn.module_of(n).register_forward_hook(count(n, shape[1:].numel()))
            for n, shape in self.site_shapes.items()
            if n.rpartition(".")[2] == "weight" and isinstance(bnn.module_of(n), (nn.Linear, nn.Conv2d))
        ]
        was_training = bnn.training
        bnn.eval()
        try:
            bnn(torch.zeros(tuple(input_shape), device=self.step_count.device))
        finally:
            bnn.train(was_training)
            for hook in hooks:
                hook.remove()
        dense = sum(macs.values())
        sparse = sum(m * self.budget[n] / self.site_shapes[n].numel() for n, m in macs.items())
        return sparse / dense if dense else 1.0
