"""Spike-and-slab guide with closed-form inclusion probabilities: Saha, Liu & Liang (2024),
*Efficient Model Compression for Bayesian Neural Networks*, arXiv:2411.00273.

Model per weight: w_i = gamma_i theta_i, gamma_i ~ Bernoulli(lambda), theta_i ~ p_i =
N(m0_i, s0_i^2) (the network's Normal prior of the site). Variational family:
q(gamma_i) = Bernoulli(phi_i), q(theta_i | gamma_i=1) = N(mu_i, sigma_i^2), q(theta_i |
gamma_i=0) = p_i (theta_i then never reaches the likelihood and costs no KL). On (gamma, theta)

    KL(q || p) = sum_i phi_i log(phi_i/lambda) + (1-phi_i) log((1-phi_i)/(1-lambda)) + phi_i KL_i,
    KL_i = KL(N(mu_i, sigma_i^2) || N(m0_i, s0_i^2)).

mu and sigma = softplus(rho) train by reparameterization, w = gamma (mu + sigma eps) with gamma
drawn without gradient (expected gradient phi_i d(A_i - KL_i)); phi is a buffer set in
closed form after every optimizer step. The paper's text was not available to us; the
update below is our derivation (the Carbonetto & Stephens 2012 / Titsias & Lazaro-Gredilla
2011 argument), and the module's tests check it against autograd on an exact ELBO.

1. With A_i, B_i the expected log-likelihood given gamma_i = 1 / 0 (other factors fixed),
   E_q log p(D | w) = phi_i A_i + (1 - phi_i) B_i, so d ELBO / d phi_i = (A_i - B_i) - KL_i
   - logit(phi_i) + logit(lambda). The ELBO is strictly concave in phi_i (second derivative
   -1/(phi_i (1 - phi_i))): the coordinate optimum is logit(phi_i) = logit(lambda) + A_i - B_i - KL_i.
2. A_i - B_i needs the data. Take log p(D | w) quadratic in w_i, c + b w_i - h w_i^2 / 2 in
   expectation over the other weights (exact for linear-Gaussian models, Laplace-like
   otherwise). Then A_i - B_i = b mu - h (mu^2 + sigma^2) / 2; with KL_i = log(s0/sigma) +
   (sigma^2 + (mu - m0)^2) / (2 s0^2) - 1/2, the stationary point of (mu_i, sigma_i), where
   the gradient phi_i d(A_i - B_i - KL_i) vanishes, is 1/sigma^2 = h + 1/s0^2,
   mu = sigma^2 (b + m0/s0^2).
3. Substituting, the sigma^2 terms sum to -1/2 and cancel the KL's +1/2, and b + m0/s0^2 =
   mu/sigma^2 turns b mu - h mu^2/2 - (mu - m0)^2/(2 s0^2) into mu^2/(2 sigma^2) - m0^2/(2 s0^2):

       logit(phi_i) = logit(lambda) + mu_i^2/(2 sigma_i^2) + log(sigma_i/s0_i) - m0_i^2/(2 s0_i^2),

   the prior log-odds plus the Savage-Dickey log Bayes factor log N(0 | m0, s0^2) -
   log N(0 | mu, sigma^2) of "slab" against "w_i = 0". Weights the data ignore (b = h = 0)
   have mu = m0, sigma = s0 and phi = lambda.

The update reads the current (mu, sigma) as if they were at that stationary point;
``update_rate`` r damps it (new = (1-r) old + r target, in logit space). Logits are clamped
to +-LOGIT_BOUND (phi in [3.1e-7, 1 - 3.1e-7]) so the KL stays finite. Caveats: it targets
the unweighted ELBO (under a KL weight beta the optimum would use (A_i - B_i)/beta), and
since the gradients of mu, rho carry the factor phi_i, once phi_i collapses an optimizer
with a long memory of earlier, larger gradients (Adam's beta2 = 0.999) nearly freezes them,
so an ignored weight can end below lambda instead of at it.

Draws are not Normal: ``record_weight_distributions`` records None and Linear/Conv2d layers
use the drawn weight under every estimator. :meth:`SpikeSlabGuide.prune` gives the
deployable :class:`PrunedSpikeSlabGuide`.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator
from types import SimpleNamespace

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions import constraints
from torch import nn

from pyro_gbnn.bayesian import BayesianNetwork
from pyro_gbnn.guides.base import BufferDict, SiteGuide, normal_kl, normal_prior, site_key
from pyro_gbnn.guides.mean_field import initial_scales, inverse_softplus

__all__ = ["SpikeSlabGuide", "PrunedSpikeSlabGuide", "SpikeSlabNormal", "LOGIT_BOUND"]

LOGIT_BOUND = 15.0


def _logit(p: float, what: str) -> float:
    if not 0.0 < p < 1.0:
        raise ValueError(f"{what} must be in the open interval (0, 1), got {p}")
    return math.log(p) - math.log1p(-p)


class SpikeSlabNormal(dist.TorchDistribution):
    """gamma * theta elementwise, theta ~ N(loc, scale^2), gamma ~ Bernoulli(probs) or a fixed 0/1 ``mask``.

    Event shape = loc's shape. ``rsample`` is differentiable in loc and scale (gamma is not);
    ``log_prob`` has no density (atom at 0): the guides give the KL in closed form instead.
    """

    arg_constraints = {}
    has_rsample = True

    def __init__(self, loc, scale, probs=None, mask=None) -> None:
        if (probs is None) == (mask is None):
            raise ValueError("SpikeSlabNormal needs exactly one of probs (random gamma) or mask (fixed gamma)")
        self.loc, self.scale, self.probs, self.mask = loc, scale, probs, mask
        super().__init__(torch.Size(), loc.shape, validate_args=False)

    @property
    def support(self):
        return constraints.independent(constraints.real, len(self.event_shape))

    def slab(self, sample_shape=torch.Size()) -> torch.Tensor:
        eps = torch.randn(torch.Size(sample_shape) + self.loc.shape, dtype=self.loc.dtype, device=self.loc.device)
        return self.loc + self.scale * eps

    def gate(self, shape: torch.Size) -> torch.Tensor:
        if self.mask is not None:
            return self.mask.to(self.loc.dtype).expand(shape)
        return torch.bernoulli(self.probs.detach().expand(shape))

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        theta = self.slab(sample_shape)
        return theta * self.gate(theta.shape)

    def log_prob(self, value):
        raise NotImplementedError("SpikeSlabNormal has an atom at 0 and no density; use the guide's kl_divergence(bnn)")


def _deployed_bytes(num_kept: int, shapes) -> int:
    return 8 * num_kept + sum(math.ceil(shape.numel() / 8) for shape in shapes)


class _SlabParameters(SiteGuide):
    """mu / rho ParameterDicts and the Normal slab prior (m0, s0) of every site."""

    def _init_slab(self, loc, rho, prior_loc, prior_scale, prior_inclusion: float) -> None:
        self.prior_inclusion = float(prior_inclusion)
        self.loc = nn.ParameterDict({site_key(n): nn.Parameter(v) for n, v in loc.items()})
        self.rho = nn.ParameterDict({site_key(n): nn.Parameter(v) for n, v in rho.items()})
        self.prior_loc = BufferDict({site_key(n): v for n, v in prior_loc.items()}, persistent=False)
        self.prior_scale = BufferDict({site_key(n): v for n, v in prior_scale.items()}, persistent=False)

    def loc_parameters(self) -> Iterator[nn.Parameter]:
        """Slab means mu."""
        return iter(self.loc.values())

    def scale_parameters(self) -> Iterator[nn.Parameter]:
        """Unconstrained slab scales rho (sigma = softplus(rho))."""
        return iter(self.rho.values())

    def scale(self, name: str) -> torch.Tensor:
        return F.softplus(self.rho[site_key(name)])

    def _slab_kl(self, name: str) -> torch.Tensor:
        key = site_key(name)
        return normal_kl(self.loc[key], self.scale(name), self.prior_loc[key], self.prior_scale[key])

    @torch.no_grad()
    def sample_weights(self, num_samples: int) -> dict[str, torch.Tensor]:
        """[S, *shape] draws of every weight. All slabs are drawn before any gate, so a pruned
        guide (fixed gates) sees the same slab noise as its source under the same seed."""
        dists = {name: self.distribution(name) for name in self.site_shapes}
        thetas = {name: d.slab((num_samples,)) for name, d in dists.items()}
        return {name: t * dists[name].gate(t.shape) for name, t in thetas.items()}


class SpikeSlabGuide(_SlabParameters):
    """q(gamma_i, theta_i) = Bernoulli(phi_i) x [gamma_i N(mu_i, sigma_i^2) + (1 - gamma_i) p_i];
    see the module docstring.

    Args:
        bnn: its prior must be a Normal (possibly ``Independent``) per site: the slab.
        prior_inclusion: lambda in (0, 1), the prior probability that a weight is kept.
        init_inclusion: phi at the start, in (0, 1).
        init_scale, xavier_gain: initial sigma, as for :class:`MeanFieldGuide`; mu starts at
            ``bnn.initial_values`` (a pretrained network).
        update_rate: r in (0, 1], damping of the closed-form phi update.
    """

    def __init__(
        self,
        bnn: BayesianNetwork,
        prior_inclusion: float = 0.5,
        init_inclusion: float = 0.99,
        init_scale: float | str = "xavier",
        xavier_gain: float = 0.01,
        update_rate: float = 1.0,
    ) -> None:
        super().__init__(bnn)
        _logit(prior_inclusion, "prior_inclusion (lambda)")
        start = min(max(_logit(init_inclusion, "init_inclusion"), -LOGIT_BOUND), LOGIT_BOUND)
        if not 0.0 < update_rate <= 1.0:
            raise ValueError(f"update_rate must be in (0, 1], got {update_rate}")
        self.update_rate = float(update_rate)
        prior_loc, prior_scale = {}, {}
        for name in self.site_shapes:
            prior_loc[name], prior_scale[name] = normal_prior(bnn, name, "SpikeSlabGuide")
        scales = initial_scales(bnn, init_scale, xavier_gain)
        loc = {n: bnn.initial_values[n].detach().clone().reshape(s) for n, s in self.site_shapes.items()}
        rho = {n: inverse_softplus(scales[n]) for n in self.site_shapes}
        self._init_slab(loc, rho, prior_loc, prior_scale, prior_inclusion)
        self.inclusion_logit = BufferDict(
            {site_key(n): torch.full(s, start, device=loc[n].device) for n, s in self.site_shapes.items()}
        )

    def inclusion(self, name: str) -> torch.Tensor:
        """phi of site ``name``: q(gamma_i = 1), shape of the weight."""
        return torch.sigmoid(self.inclusion_logit[site_key(name)])

    def distribution(self, name: str) -> SpikeSlabNormal:
        return SpikeSlabNormal(self.loc[site_key(name)], self.scale(name), probs=self.inclusion(name))

    def kl_divergence(self, bnn: BayesianNetwork | None = None) -> torch.Tensor:
        """KL(q || p) on (gamma, theta), summed; differentiable in mu and rho, phi a constant.

        The slab priors were read from ``bnn`` at construction; the argument is the ELBO's protocol.
        """
        lam = self.prior_inclusion
        total = 0.0
        for name in self.site_shapes:
            logit = self.inclusion_logit[site_key(name)]
            phi = torch.sigmoid(logit)
            bernoulli = phi * (F.logsigmoid(logit) - math.log(lam)) + (1 - phi) * (
                F.logsigmoid(-logit) - math.log1p(-lam)
            )
            total = total + (bernoulli + phi * self._slab_kl(name)).sum()
        return torch.as_tensor(total)

    def inclusion_target(self, name: str) -> torch.Tensor:
        """The closed-form optimum of logit(phi) for site ``name`` (module docstring, step 3), unclamped."""
        key = site_key(name)
        mu, sigma = self.loc[key].detach(), self.scale(name).detach()
        sigma = sigma.clamp_min(torch.finfo(sigma.dtype).tiny)  # mu / 0 would give inf - inf
        m0, s0 = self.prior_loc[key], self.prior_scale[key]
        prior_logit = math.log(self.prior_inclusion) - math.log1p(-self.prior_inclusion)
        return prior_logit + 0.5 * (mu / sigma) ** 2 + torch.log(sigma / s0) - 0.5 * (m0 / s0) ** 2

    @torch.no_grad()
    def update_inclusion(self) -> None:
        """Move every logit(phi) to (1 - r) old + r target, clamped to +-LOGIT_BOUND."""
        r = self.update_rate
        for name in self.site_shapes:
            logit = self.inclusion_logit[site_key(name)]
            new = (1 - r) * logit + r * self.inclusion_target(name)
            logit.copy_(new.clamp_(-LOGIT_BOUND, LOGIT_BOUND))

    def after_step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Closed-form phi update, run after every optimizer step."""
        self.update_inclusion()

    @torch.no_grad()
    def sparsity(self, threshold: float = 0.5) -> float:
        """Fraction of weights with phi <= threshold (those :meth:`prune` sets to 0)."""
        pruned = sum(int((self.inclusion(n) <= threshold).sum()) for n in self.site_shapes)
        return pruned / max(sum(s.numel() for s in self.site_shapes.values()), 1)

    @torch.no_grad()
    def prune(self, threshold: float = 0.5) -> PrunedSpikeSlabGuide:
        """Keep N(mu, sigma^2) where phi > threshold, exactly 0 elsewhere (copies, not views)."""
        masks = {n: self.inclusion(n) > threshold for n in self.site_shapes}
        loc = {n: self.loc[site_key(n)] * m for n, m in masks.items()}
        rho = {n: self.rho[site_key(n)].detach().clone() for n in masks}
        prior = [{n: getattr(self, part)[site_key(n)] for n in masks} for part in ("prior_loc", "prior_scale")]
        return PrunedSpikeSlabGuide(loc, rho, masks, *prior, self.prior_inclusion)

    @torch.no_grad()
    def pruned_size_bytes(self, threshold: float = 0.5) -> int:
        """``prune(threshold).size_bytes()``, without building the pruned guide."""
        kept = sum(int((self.inclusion(n) > threshold).sum()) for n in self.site_shapes)
        return _deployed_bytes(kept, self.site_shapes.values())


class PrunedSpikeSlabGuide(_SlabParameters):
    """The deployable posterior: w_i ~ N(mu_i, sigma_i^2) for kept weights, w_i = 0 exactly otherwise.

    The ``mask`` buffers are fixed; mu and rho stay parameters (fine-tuning is possible,
    pruned entries receive no gradient). ``kl_divergence`` is the spike-and-slab KL with
    phi in {0, 1}: sum_kept (-log lambda + KL_i) + n_pruned (-log(1 - lambda)).
    """

    def __init__(self, loc, rho, mask, prior_loc, prior_scale, prior_inclusion: float) -> None:
        super().__init__(SimpleNamespace(site_shapes=OrderedDict((n, v.shape) for n, v in loc.items())))
        self._init_slab(loc, rho, prior_loc, prior_scale, prior_inclusion)
        self.mask = BufferDict({site_key(n): m.to(torch.bool).clone() for n, m in mask.items()})

    def distribution(self, name: str) -> SpikeSlabNormal:
        key = site_key(name)
        return SpikeSlabNormal(self.loc[key], self.scale(name), mask=self.mask[key])

    def kl_divergence(self, bnn: BayesianNetwork | None = None) -> torch.Tensor:
        lam, total = self.prior_inclusion, 0.0
        for name in self.site_shapes:
            kept = self.mask[site_key(name)]
            n_kept = kept.sum()  # a tensor: no device synchronisation per step
            total = total + torch.where(kept, self._slab_kl(name), 0.0).sum()
            total = total - n_kept * math.log(lam) - (kept.numel() - n_kept) * math.log1p(-lam)
        return torch.as_tensor(total)

    def num_kept(self) -> int:
        """Number of weights that are not pruned."""
        return sum(int(self.mask[site_key(n)].sum()) for n in self.site_shapes)

    def size_bytes(self) -> int:
        """Storage as deployed: 4 bytes (fp32) for each kept mu and sigma, plus a 1-bit
        keep-mask per weight packed per tensor (ceil(numel / 8) bytes each). Prior and
        shapes are not counted."""
        return _deployed_bytes(self.num_kept(), self.site_shapes.values())
