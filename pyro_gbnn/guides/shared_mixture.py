"""The 2DGBNN guide: inlier weights tied to K shared 2D Gaussians, outliers on their own.

Each component k is a 2D Gaussian N(m_k, Sigma_k) over a weight's (mean, std): centre
``(centre_mu, softplus(centre_rho))`` and Cholesky factor
``[[exp(chol_log_00), 0], [chol_10, exp(chol_log_11)]]``, five values per component;
each outlier has its own mean and scale. Which weight uses what is fixed by the stage-2
:class:`~pyro_gbnn.sharing.plan.SharingPlan` and stored as buffers. Only the values that
reach the objective under the chosen semantics and prior are trainable (``requires_grad``);
the others stay at their stage-2 values and are not counted as parameters.

Three sampling semantics. Algorithm 1 (lines 26-28) draws every inlier weight on its own
from its mixture; ``hierarchical`` and ``independent`` are two readings of that, ``tied``
is the authors' released code, which does something else:

``tied`` (the authors' code, the default). Per forward sample, one draw
z_k ~ N(m_k, Sigma_k) per component; every inlier of component k takes the mean
coordinate of z_k, an ellipse weight takes sum_j alpha_j z_{c_j}. A weight's noise is
sqrt(Sigma_k[0, 0]), the spread of the members' means; the std coordinate never reaches
the likelihood. Trainable: centre_mu and chol_log_00 (``prior="weight"``), all five
(``prior="anchor"``, whose 2D KL couples them). This is a different model, not a
compressed posterior of the per-weight network: K shared weights z_k, each under the
weight prior, and every member weight *equal* to its component's (ellipse weights fixed
alpha-combinations). Its objective is that model's exact ELBO, with K KL terms instead
of one per weight. It is not a bound on the per-weight ELBO of Eq. 10: there q(w) puts
all its mass on the subspace where members are equal, so KL(q(w) || p(w)) is infinite.

``hierarchical`` (Alg. 1 lines 26-28 with a draw per component). Per forward sample, one
2D draw (mu~_k, sigma~_k) ~ N(m_k, Sigma_k) per component, and every member weight
draws its own w_i = mu~_k + |sigma~_k| eps_i. Sigma reaches the likelihood, all five
values train, and given the component draws the weights are independent Normals, so
local reparameterization and flipout apply. An ellipse weight is, given the draws, the
Normal with the mean and variance of its alpha-mixture sum_j alpha_j N(mu~_j, sigma~_j^2)
(Eq. 7): the same first two moments as drawing a component per weight per sample, which
is all a layer's pre-activation sees under local reparameterization, and it keeps every
weight Normal.

``independent`` (Alg. 1 lines 26-28 read literally with each weight's own component).
Each inlier draws its own value from N(m_k, s_k^2), with (m_k, s_k) its component's
centre: a mean-field posterior whose parameters are shared; ellipse weights are Normal
with the moments of their alpha-mixture. Trainable: centre_mu and centre_rho.

The KL terms, as :meth:`kl_divergence` returns them: for ``independent`` and
``hierarchical`` upper bounds on the per-weight KL, so the objective is the bounded ELBO
of Eq. 10; for ``tied`` the exact KL of the tied model (see above):

* outliers: sum_i KL(N(loc_i, scale_i^2) || p_i), exact.
* ``independent``: each weight's q is Normal; for an ellipse weight, the moment-matched
  Normal of sum_j alpha_j N(m_j, s_j^2). With a Gaussian prior, the cross-entropy depends
  on the first two moments only and the matched Normal has the largest entropy, so
  KL(q_i || p_i) <= KL(mixture || p_i) <= sum_j alpha_ij KL(N(m_j, s_j^2) || p_i) by
  convexity. The term is therefore sum_k n_k KL(N(m_k, s_k^2) || p) with n_k the
  alpha-weighted member counts (computed per weight, so layer-wise priors are exact): an
  upper bound on the true KL, i.e. the objective is a lower bound on the ELBO.
* ``hierarchical``: KL(q(w) || p(w)) <= KL(q(w, z) || p(w) q(z)) = E_z KL(q(w | z) || p(w))
  (the chain rule of KL: marginalising z cannot increase it), a bound, tight as Sigma -> 0,
  loose by the information the weights carry about the component draws. Given z the
  weights are independent, so it is a sum over weights, and the ellipse weights' matched
  Normals are bounded by their alpha-mixtures as above. For a weight of component k with
  prior N(p_i, s_i^2):
  E_z KL = log s_i - E log|sigma~_k| + (V_11 + m_k1^2 + V_00 + (m_k0 - p_i)^2) / (2 s_i^2) - 1/2,
  V = Sigma_k, and E log|sigma~_k| in closed form
  (:func:`~pyro_gbnn.guides.log_abs_normal.expected_log_abs_normal`). Sums over a
  component's members of alpha_i, alpha_i / s_i^2, alpha_i p_i / s_i^2,
  alpha_i p_i^2 / s_i^2 and alpha_i log s_i are computed once, so a step costs O(K).
  The bound rewards no spread in Sigma, so training tends to narrow the components.
* ``tied``: sum_k KL(q(z_k) || p(z_k)), exact for the tied model's K shared weights
  (not a term of Eq. 10, whose per-weight KL is infinite under tying). With
  ``prior="weight"`` (default) p is the network's prior of a weight, on the mean
  coordinate (the std coordinate does not enter the likelihood); a component whose
  members span layers with different priors takes the prior of the layer holding most of
  them. With ``prior="anchor"`` p(z_k) is the stage-2 component itself,
  N(m_k^(0), Sigma_k^(0)), an empirical-Bayes anchor (the authors' code).
* ``kl_weighting="paper"`` weights each component's KL by the mixture proportion pi_k as
  Eq. 10 is printed, instead of by its member count (independent, hierarchical) or 1
  (tied). The proportions sum to one, so this shrinks the mixture term by a factor of
  about the number of shared weights (independent, hierarchical) or is at most the
  largest KL (tied): the result is no longer a bound on the ELBO, only a regulariser of
  similar shape.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions.kl import kl_divergence as _kl
from pyro.nn import PyroModule
from torch import nn

from pyro_gbnn.bayesian import BayesianNetwork
from pyro_gbnn.guides.base import network_device, normal_prior, zero_optimizer_state
from pyro_gbnn.guides.log_abs_normal import expected_log_abs_normal
from pyro_gbnn.guides.mean_field import inverse_softplus
from pyro_gbnn.local_params import LocalParams
from pyro_gbnn.sharing.build import SharingSettings, merge_with_settings
from pyro_gbnn.sharing.plan import SharingPlan, index_dtype

__all__ = ["SharedMixtureGuide", "SEMANTICS", "COMPONENT_VALUES"]

SEMANTICS = ("tied", "hierarchical", "independent")
COMPONENT_VALUES = ("centre_mu", "centre_rho", "chol_log_00", "chol_10", "chol_log_11")
PRIOR_CHOICES = ("weight", "anchor")
KL_WEIGHTINGS = ("sum", "paper")


def _normal_prior_vectors(bnn: BayesianNetwork, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    priors = [normal_prior(bnn, name, "2DGBNN's KL") for name in names]
    shapes = [bnn.site_shapes[name] for name in names]
    locs = [loc.expand(shape).reshape(-1) for (loc, _), shape in zip(priors, shapes)]
    scales = [scale.expand(shape).reshape(-1) for (_, scale), shape in zip(priors, shapes)]
    return torch.cat(locs), torch.cat(scales)


def _component_values(means: torch.Tensor, covs: torch.Tensor) -> dict[str, torch.Tensor]:
    """The five unconstrained values per component (see COMPONENT_VALUES) of centres [K, 2]
    and covariances [K, 2, 2]."""
    chol = torch.linalg.cholesky(covs)
    return {
        "centre_mu": means[:, 0],
        "centre_rho": inverse_softplus(means[:, 1].clamp_min(1e-6)),
        "chol_log_00": chol[:, 0, 0].log(),
        "chol_10": chol[:, 1, 0],
        "chol_log_11": chol[:, 1, 1].log(),
    }


_TRAINED = {  # (semantics, prior) -> component values that reach the objective
    ("tied", "weight"): ("centre_mu", "chol_log_00"),
    ("tied", "anchor"): COMPONENT_VALUES,
    ("hierarchical", "weight"): COMPONENT_VALUES,
    ("independent", "weight"): ("centre_mu", "centre_rho"),
}


class SharedMixtureGuide(LocalParams, PyroModule):
    """Guide over ``bnn``'s weights following a stage-2 :class:`SharingPlan` (see module doc)."""

    def __init__(
        self,
        bnn: BayesianNetwork,
        plan: SharingPlan,
        semantics: str = "tied",
        prior: str = "weight",
        kl_weighting: str = "sum",
    ) -> None:
        for value, accepted, what in (
            (semantics, SEMANTICS, "semantics"),
            (prior, PRIOR_CHOICES, "prior"),
            (kl_weighting, KL_WEIGHTINGS, "kl_weighting"),
        ):
            if value not in accepted:
                raise ValueError(f"{what} {value!r} is unknown; use one of {accepted}")
        if (semantics, prior) not in _TRAINED:
            raise ValueError(
                f"prior {prior!r} applies to the tied semantics only; use prior 'weight' with {semantics!r}"
            )
        if list(bnn.site_shapes) != list(plan.site_names):
            raise ValueError("the sharing plan was made for another network: its sites differ from bnn.site_shapes")
        plan.check()
        plan = plan.to(network_device(bnn))  # the guide lives where the network's weights do
        super().__init__()
        self.semantics, self.prior_choice, self.kl_weighting = semantics, prior, kl_weighting
        self.site_shapes = bnn.site_shapes
        self._sizes = [int(torch.Size(s).numel()) for s in self.site_shapes.values()]
        means, covs = plan.means.float(), plan.covs.float()
        trained = _TRAINED[(semantics, prior)]
        for name, value in _component_values(means, covs).items():
            setattr(self, name, nn.Parameter(value.clone(), requires_grad=name in trained))
        self.outlier_loc = nn.Parameter(plan.outlier_loc.float().clone())
        self.outlier_rho = nn.Parameter(inverse_softplus(plan.outlier_scale.float().clamp_min(1e-6)))

        # Stored compactly (as in the plan) and once more as int32 for the gathers of every
        # step (index_select and indexing take int32: half the memory of int64 indices).
        self.register_buffer("inlier_component", plan.inlier_component.clone())
        self.register_buffer("ellipse_components", plan.ellipse_components.clone())
        self.register_buffer("ellipse_alphas", plan.ellipse_alphas.float().clone())
        self.register_buffer("anchor_means", means.clone())
        self.register_buffer("anchor_covs", covs.clone())
        order = torch.cat([plan.outlier_index, plan.inlier_index, plan.ellipse_index]).long()
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        self.register_buffer("_gather", inverse.int(), persistent=False)
        self.register_buffer("_inlier_gather", plan.inlier_component.int(), persistent=False)
        self.register_buffer("_ellipse_gather", plan.ellipse_components.int(), persistent=False)
        self.register_buffer("outlier_index", plan.outlier_index.long().clone())
        self.register_buffer("inlier_index", plan.inlier_index.long().clone())
        self.register_buffer("ellipse_index", plan.ellipse_index.long().clone())

        # The weights' Normal priors, kept only where a KL term reads them: the outliers',
        # every shared weight's (independent), or per-component sums over them (hierarchical).
        prior_loc, prior_scale = _normal_prior_vectors(bnn, list(self.site_shapes))
        # Persistent: merging during fine-tuning rewrites them (see merge_close_components).
        self.register_buffer("_component_prior", self._component_priors(prior_loc, prior_scale))
        roles = {"outlier": self.outlier_index}
        if semantics == "independent":
            roles |= {"inlier": self.inlier_index, "ellipse": self.ellipse_index.unsqueeze(-1)}
        for role, index in roles.items():
            self.register_buffer(f"_{role}_prior_loc", prior_loc[index], persistent=False)
            self.register_buffer(f"_{role}_prior_scale", prior_scale[index], persistent=False)
        if semantics == "hierarchical":
            self.register_buffer("_prior_sums", self._member_prior_sums(prior_loc, prior_scale))
        self.register_buffer("counts", plan.counts.float().clone())
        self.register_buffer("alive", torch.ones(self.num_components, dtype=torch.bool, device=means.device))
        self.register_load_state_dict_post_hook(lambda module, keys: module._derive_gathers())

    def _derive_gathers(self) -> None:
        """The int32 gather indices from the stored component indices (after loading or merging)."""
        self._inlier_gather = self.inlier_component.int()
        self._ellipse_gather = self.ellipse_components.int()

    # ----- parameters -------------------------------------------------------------
    @property
    def num_components(self) -> int:
        """Component slots K; after merging during fine-tuning some are no longer ``alive``."""
        return int(self.centre_mu.shape[0])

    def num_trainable_values(self) -> int:
        """Values that reach the objective: the trained ones of every alive component, and
        each outlier's mean and scale (what ``n_params_trainable`` reports)."""
        per_component = sum(1 for name in COMPONENT_VALUES if getattr(self, name).requires_grad)
        return per_component * int(self.alive.sum()) + 2 * self.outlier_loc.numel()

    def loc_parameters(self) -> list[nn.Parameter]:
        """Trainable means (component mean coordinates, outlier means): the ``lr`` group."""
        return [p for p in (self.centre_mu, self.outlier_loc) if p.requires_grad]

    def scale_parameters(self) -> list[nn.Parameter]:
        """Every other trainable value (std coordinates, covariance factors): the ``lr_scale`` group."""
        locations = {id(p) for p in self.loc_parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in locations]

    def component_scale(self) -> torch.Tensor:
        """Std coordinate s_k of each centre (the weight std under ``independent``)."""
        return F.softplus(self.centre_rho)

    def component_centres(self) -> torch.Tensor:
        """[K, 2] centre of each component: (mean coordinate, std coordinate)."""
        return torch.stack([self.centre_mu, self.component_scale()], -1)

    def component_cholesky(self) -> torch.Tensor:
        """[K, 2, 2] lower-triangular factors of the component covariances."""
        zero = torch.zeros_like(self.chol_10)
        return torch.stack(
            [torch.stack([self.chol_log_00.exp(), zero], -1), torch.stack([self.chol_10, self.chol_log_11.exp()], -1)],
            -2,
        )

    def outlier_scale(self) -> torch.Tensor:
        return F.softplus(self.outlier_rho)

    def _members(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(weight index, component, alpha) of every shared weight's link to a component."""
        k = self._ellipse_gather.shape[1] if self._ellipse_gather.dim() == 2 else 0
        weights = torch.cat([self.inlier_index, self.ellipse_index.repeat_interleave(k)])
        comps = torch.cat([self._inlier_gather, self._ellipse_gather.reshape(-1)]).long()
        alphas = torch.cat(
            [torch.ones(self.inlier_index.numel(), device=weights.device), self.ellipse_alphas.reshape(-1)]
        )
        return weights, comps, alphas

    def _component_priors(self, prior_loc: torch.Tensor, prior_scale: torch.Tensor) -> torch.Tensor:
        """[K, 2] (loc, scale) of the weight prior each component's draw is held to (tied)."""
        k = self.num_components
        members = torch.cat([self.inlier_index, self.ellipse_index])
        comps = torch.cat(
            [
                self._inlier_gather,
                self._ellipse_gather[:, 0] if self._ellipse_gather.numel() else self._inlier_gather[:0],
            ]
        )
        sizes = torch.tensor(self._sizes, device=members.device)
        site_of = torch.bucketize(members, sizes.cumsum(0), right=True)
        n_sites = len(self._sizes)
        cells = (comps * n_sites + site_of).long()
        votes = (
            torch.zeros(k * n_sites, dtype=torch.long, device=cells.device)
            .index_add_(0, cells, torch.ones_like(cells))
            .view(k, n_sites)
        )
        major_site = votes.argmax(1)
        offsets = sizes.cumsum(0) - sizes
        first_weight = offsets[major_site]
        return torch.stack([prior_loc[first_weight], prior_scale[first_weight]], -1)

    def _member_prior_sums(self, prior_loc: torch.Tensor, prior_scale: torch.Tensor) -> torch.Tensor:
        """[5, K] float64 sums over each component's members of alpha, alpha/s^2,
        alpha p/s^2, alpha p^2/s^2 and alpha log s (p, s: a member's prior loc and scale)."""
        weights, comps, alphas = self._members()
        p, s = prior_loc[weights].double(), prior_scale[weights].double()
        a, precision = alphas.double(), 1.0 / (s * s)
        terms = torch.stack([a, a * precision, a * p * precision, a * p * p * precision, a * s.log()])
        return torch.zeros(5, self.num_components, dtype=torch.float64, device=comps.device).index_add_(1, comps, terms)

    # ----- sampling ---------------------------------------------------------------
    def _assemble(self, outliers: torch.Tensor, inliers: torch.Tensor, ellipses: torch.Tensor) -> torch.Tensor:
        """Values in role order -> flat weight vector in site order (leading dims kept)."""
        return torch.cat([outliers, inliers, ellipses], -1).index_select(-1, self._gather)

    def _split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        lead = flat.shape[:-1]
        return {
            name: part.reshape(*lead, *shape)
            for (name, shape), part in zip(self.site_shapes.items(), torch.split(flat, self._sizes, -1))
        }

    def _tied_values(self, sample_shape: torch.Size) -> torch.Tensor:
        eps = torch.randn(*sample_shape, self.num_components, device=self.centre_mu.device)
        z = self.centre_mu + self.chol_log_00.exp() * eps
        inliers = z.index_select(-1, self._inlier_gather)
        ellipses = (z[..., self._ellipse_gather] * self.ellipse_alphas).sum(-1)
        outliers = self.outlier_loc + self.outlier_scale() * torch.randn(
            *sample_shape, self.outlier_loc.numel(), device=eps.device
        )
        return self._assemble(outliers, inliers, ellipses)

    def _component_draws(self, sample_shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu~, |sigma~|), each [*sample_shape, K]: one 2D draw from every component."""
        eps = torch.randn(*sample_shape, 2, self.num_components, device=self.centre_mu.device)
        mu = self.centre_mu + self.chol_log_00.exp() * eps[..., 0, :]
        sigma = self.component_scale() + self.chol_10 * eps[..., 0, :] + self.chol_log_11.exp() * eps[..., 1, :]
        return mu, sigma.abs()

    def _weight_moments_given(self, m: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat per-weight (loc, scale) when component k's weights are N(m_k, s_k^2)."""
        alphas = self.ellipse_alphas
        ell_m = (m[..., self._ellipse_gather] * alphas).sum(-1)
        ell_second = ((s * s + m * m)[..., self._ellipse_gather] * alphas).sum(-1)
        ell_s = (ell_second - ell_m * ell_m).clamp_min(1e-12).sqrt()
        lead = m.shape[:-1]
        loc = self._assemble(self.outlier_loc.expand(*lead, -1), m.index_select(-1, self._inlier_gather), ell_m)
        scale = self._assemble(self.outlier_scale().expand(*lead, -1), s.index_select(-1, self._inlier_gather), ell_s)
        return loc, scale

    def weight_moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat per-weight (loc, scale) of the ``independent`` guide, in site order."""
        return self._weight_moments_given(self.centre_mu, self.component_scale())

    def _normal_moments(self, sample_shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-weight Normal (loc, scale) of one draw: given the component draws (hierarchical)."""
        if self.semantics == "hierarchical":
            loc, scale = self._weight_moments_given(*self._component_draws(sample_shape))
            return loc, scale.clamp_min(1e-12)
        loc, scale = self.weight_moments()
        return loc.expand(*sample_shape, -1), scale.expand(*sample_shape, -1)

    def forward(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        if self.semantics == "tied":
            values = self._split(self._tied_values(torch.Size()))
            return {n: pyro.sample(n, dist.Delta(v, event_dim=v.dim())) for n, v in values.items()}
        locs, scales = (self._split(t) for t in self._normal_moments(torch.Size()))
        return {n: pyro.sample(n, dist.Normal(locs[n], scales[n]).to_event(locs[n].dim())) for n in self.site_shapes}

    @torch.no_grad()
    def sample_weights(self, num_samples: int) -> dict[str, torch.Tensor]:
        """``num_samples`` draws of every weight, [S, *shape], vectorised."""
        if self.semantics == "tied":
            return self._split(self._tied_values(torch.Size([num_samples])))
        loc, scale = self._normal_moments(torch.Size([num_samples]))
        return self._split(loc + scale * torch.randn_like(loc))

    @torch.no_grad()
    def sample_components(self, num_samples: int) -> torch.Tensor:
        """[S, K_alive, 2] draws of the alive components' (mean, std) from N(m_k, Sigma_k)."""
        slots = self.alive.nonzero().squeeze(-1)
        centre = self.component_centres()[slots]
        eps = torch.randn(num_samples, slots.numel(), 2, 1, device=centre.device)
        return centre + (self.component_cholesky()[slots] @ eps).squeeze(-1)

    # ----- KL -----------------------------------------------------------------------
    def kl_divergence(self, bnn: BayesianNetwork | None = None) -> torch.Tensor:
        """The mixture KL term plus the outliers' KL (see the module doc for what each is)."""
        normal = torch.distributions.Normal
        outlier_prior = normal(self._outlier_prior_loc, self._outlier_prior_scale)
        outliers = _kl(normal(self.outlier_loc, self.outlier_scale()), outlier_prior).sum()
        shared = {"tied": self._tied_kl, "hierarchical": self._hierarchical_kl, "independent": self._independent_kl}
        return outliers + shared[self.semantics]()

    def _per_shared_weight(self, total: torch.Tensor) -> torch.Tensor:
        """``kl_weighting="paper"``: the mixture term divided by the number of shared weights."""
        if self.kl_weighting == "paper":
            return total / max(1, self.inlier_index.numel() + self.ellipse_index.numel())
        return total

    def _tied_kl(self) -> torch.Tensor:
        if self.prior_choice == "anchor":
            scale_tril = self.component_cholesky()
            centre = self.component_centres()
            q = torch.distributions.MultivariateNormal(centre, scale_tril=scale_tril)
            p = torch.distributions.MultivariateNormal(self.anchor_means, covariance_matrix=self.anchor_covs)
            per_component = torch.distributions.kl_divergence(q, p)
        else:
            q = torch.distributions.Normal(self.centre_mu, self.chol_log_00.exp())
            p = torch.distributions.Normal(self._component_prior[:, 0], self._component_prior[:, 1])
            per_component = torch.distributions.kl_divergence(q, p)
        if self.kl_weighting == "paper":
            return (per_component * self.counts / self.counts.sum().clamp_min(1e-12)).sum()
        return (per_component * self.alive).sum()

    def _hierarchical_kl(self) -> torch.Tensor:
        count, precision, loc_precision, loc2_precision, log_scale = self._prior_sums.to(self.centre_mu.dtype)
        m0, m1 = self.centre_mu, self.component_scale()
        v00 = self.chol_log_00.exp().square()
        v11 = self.chol_10.square() + self.chol_log_11.exp().square()
        second_moments = (m1 * m1 + v11 + m0 * m0 + v00) * precision - 2 * m0 * loc_precision + loc2_precision
        per_component = log_scale - count * expected_log_abs_normal(m1, v11) + 0.5 * second_moments - 0.5 * count
        return self._per_shared_weight(per_component.sum())

    def _independent_kl(self) -> torch.Tensor:
        normal = torch.distributions.Normal
        m, s = self.centre_mu, self.component_scale()
        kl_in = torch.distributions.kl_divergence(
            normal(m[self._inlier_gather], s[self._inlier_gather]),
            normal(self._inlier_prior_loc, self._inlier_prior_scale),
        ).sum()
        kl_ell = torch.zeros((), device=m.device)
        if self.ellipse_index.numel():
            per = torch.distributions.kl_divergence(
                normal(m[self._ellipse_gather], s[self._ellipse_gather]),
                normal(self._ellipse_prior_loc, self._ellipse_prior_scale),
            )
            kl_ell = (per * self.ellipse_alphas).sum()
        return self._per_shared_weight(kl_in + kl_ell)

    # ----- merging during fine-tuning and the plan as it stands ------------------------
    def component_gaussians(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Current centres [K, 2] (mean, std coordinate) and covariances [K, 2, 2], detached."""
        scale_tril = self.component_cholesky().detach()
        centre = self.component_centres().detach()
        return centre, scale_tril @ scale_tril.mT

    @torch.no_grad()
    def merge_close_components(self, optimizer: torch.optim.Optimizer | None, settings: SharingSettings) -> int:
        """Merge alive components that have come close during fine-tuning (the authors' code
        repeats stage 2's merging while it trains); returns how many components went.

        The tests and rule are stage 2's (``settings.merge_*``, see
        :func:`~pyro_gbnn.sharing.merging.merge_components`) on the current centres and
        covariances; the gradient step at a centre is |d loss / d centre_mu| / members x
        ``merge_grad_lr`` from the last step (skipped if no gradient is there yet). A merged
        component keeps the slot of its first member; the other slot is no longer ``alive``:
        it has no members, its KL is masked and its optimizer state is zeroed, so it stays
        exactly where it was. The merged component keeps the prior of its slot (the same for
        every component under an IID prior).
        """
        slots = self.alive.nonzero().squeeze(-1)
        if slots.numel() < 2:
            return 0
        centre, covs = (t[slots].double() for t in self.component_gaussians())
        counts = self.counts[slots].double()
        grad = self.centre_mu.grad
        step = None if grad is None else grad[slots].abs().double() / counts.clamp_min(1) * settings.merge_grad_lr
        merged = merge_with_settings(centre, covs, counts, step, settings)
        if merged.rounds == 0:
            return 0
        k_new = merged.means.shape[0]
        first = torch.full((k_new,), slots.numel(), dtype=torch.long, device=slots.device).scatter_reduce_(
            0, merged.mapping, torch.arange(slots.numel(), device=slots.device), "amin"
        )
        new_slots = slots[first]
        slot_of = torch.arange(self.num_components, device=slots.device)
        slot_of[slots] = new_slots[merged.mapping]
        changed = slots[slot_of[slots] != slots]
        changed = torch.cat([changed, new_slots[torch.bincount(merged.mapping, minlength=k_new) > 1]])

        for name, value in _component_values(merged.means.float(), merged.covs.float()).items():
            getattr(self, name)[new_slots] = value
        self.alive[slots] = False
        self.alive[new_slots] = True
        dtype = self.inlier_component.dtype
        self.inlier_component.copy_(slot_of[self.inlier_component.long()].to(dtype))
        self.ellipse_components.copy_(slot_of[self.ellipse_components.long()].to(dtype))
        self.counts.copy_(torch.zeros_like(self.counts).index_add_(0, slot_of, self.counts))
        if self.semantics == "hierarchical":
            self._prior_sums.copy_(torch.zeros_like(self._prior_sums).index_add_(1, slot_of, self._prior_sums))
        self._derive_gathers()
        zero_optimizer_state(optimizer, [getattr(self, name) for name in COMPONENT_VALUES], changed)
        return slots.numel() - k_new

    @torch.no_grad()
    def plan(self) -> SharingPlan:
        """The sharing plan as the guide stands: alive components renumbered, current centres,
        covariances and outlier moments (for counting, saving and deployment)."""
        slots = self.alive.nonzero().squeeze(-1)
        renumber = torch.full((self.num_components,), -1, dtype=torch.long, device=slots.device)
        renumber[slots] = torch.arange(slots.numel(), device=slots.device)
        centre, covs = self.component_gaussians()
        dtype = index_dtype(slots.numel())
        return SharingPlan(
            site_names=list(self.site_shapes),
            site_shapes=[list(s) for s in self.site_shapes.values()],
            means=centre[slots].clone(),
            covs=covs[slots].clone(),
            counts=self.counts[slots].clone(),
            outlier_index=self.outlier_index.clone(),
            outlier_loc=self.outlier_loc.detach().clone(),
            outlier_scale=self.outlier_scale().detach(),
            inlier_index=self.inlier_index.clone(),
            inlier_component=renumber[self.inlier_component.long()].to(dtype),
            ellipse_index=self.ellipse_index.clone(),
            ellipse_components=renumber[self.ellipse_components.long()].to(dtype),
            ellipse_alphas=self.ellipse_alphas.clone(),
            report={},
        )
