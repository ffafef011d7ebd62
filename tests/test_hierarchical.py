"""The hierarchical 2DGBNN semantics: its moments, its KL bound, and E log|X| behind it."""

import math

import pytest
import torch
from scipy import integrate
from torch import nn

from pyro_gbnn import BayesianNetwork, Categorical, IIDNormalPrior, LayerwiseNormalPrior
from pyro_gbnn.guides.log_abs_normal import _SERIES_FROM, _poisson_branch, _series_branch, expected_log_abs_normal
from pyro_gbnn.guides.shared_mixture import SharedMixtureGuide
from pyro_gbnn.sharing.plan import SharingPlan

F64 = torch.float64


@pytest.mark.parametrize(
    ("mean", "var"),
    [(0.0, 1.0), (1.0, 1.0), (-3.0, 0.5), (0.015, 0.0003**2), (2.0, 1e-4), (8.94, 1.0), (8.95, 1.0)],
)
def test_expected_log_abs_normal_matches_numerical_integration(mean, var):
    sd = math.sqrt(var)
    density = lambda x: math.log(abs(x)) * math.exp(-((x - mean) ** 2) / (2 * var)) / math.sqrt(2 * math.pi * var)  # noqa: E731
    singular = [0.0] if abs(mean) < 20 * sd else None
    exact, _ = integrate.quad(density, mean - 40 * sd, mean + 40 * sd, points=singular, limit=500, epsabs=1e-13)
    value = expected_log_abs_normal(torch.tensor(mean, dtype=F64), torch.tensor(var, dtype=F64))
    assert abs(value.item() - exact) < 1e-8


def test_expected_log_abs_normal_branches_meet_and_gradients_are_finite():
    at_switch = torch.tensor([_SERIES_FROM], dtype=F64)
    assert abs((_poisson_branch(at_switch) - _series_branch(at_switch)).item()) < 1e-8
    mean = torch.tensor([0.0, 1e-3, 0.5, 3.0, 100.0], dtype=F64, requires_grad=True)
    var = torch.tensor([1.0, 1.0, 1.0, 1e-2, 1e-2], dtype=F64, requires_grad=True)
    expected_log_abs_normal(mean, var).sum().backward()
    assert torch.isfinite(mean.grad).all() and torch.isfinite(var.grad).all()
    # d/d mean of E log|m + sd t| at large |m|/sd is ~ 1/m.
    assert abs(mean.grad[-1].item() - 1 / 100.0) < 1e-6


def tiny_plan(ellipse: bool = True) -> tuple[BayesianNetwork, SharingPlan]:
    """A Linear(3, 2) (8 weights): one outlier, two components, and an ellipse weight."""
    bnn = BayesianNetwork(nn.Linear(3, 2), LayerwiseNormalPrior("radford"), Categorical(10))
    means = torch.tensor([[0.05, 0.02], [-0.1, 0.04]])
    covs = torch.tensor([[[4e-4, 1e-5], [1e-5, 2e-5]], [[1e-4, -2e-5], [-2e-5, 9e-5]]])
    inliers = [1, 2, 3, 4, 5, 6] if ellipse else [1, 2, 3, 4, 5, 6, 7]
    components = [0, 0, 1, 1, 0, 1] if ellipse else [0, 0, 1, 1, 0, 1, 0]
    plan = SharingPlan(
        site_names=list(bnn.site_shapes), site_shapes=[list(s) for s in bnn.site_shapes.values()],
        means=means, covs=covs, counts=torch.tensor([3.5, 3.5]) if ellipse else torch.tensor([4.0, 3.0]),
        outlier_index=torch.tensor([0]), outlier_loc=torch.tensor([0.5]), outlier_scale=torch.tensor([0.03]),
        inlier_index=torch.tensor(inliers), inlier_component=torch.tensor(components, dtype=torch.uint8),
        ellipse_index=torch.tensor([7] if ellipse else [], dtype=torch.long),
        ellipse_components=torch.tensor([[0, 1]] if ellipse else [], dtype=torch.uint8).reshape(-1, 2),
        ellipse_alphas=torch.tensor([[0.3, 0.7]] if ellipse else []).reshape(-1, 2),
        report={},
    )
    return bnn, plan


def prior_vectors(bnn):
    loc = torch.cat([bnn.prior_distribution(n).base_dist.loc.expand(s).reshape(-1) for n, s in bnn.site_shapes.items()])
    scale = torch.cat([bnn.prior_distribution(n).base_dist.scale.expand(s).reshape(-1) for n, s in bnn.site_shapes.items()])
    return loc, scale


def flat_draws(guide, n):
    return torch.cat([w.reshape(n, -1) for w in guide.sample_weights(n).values()], -1).double()


def test_hierarchical_moments_follow_the_component_draws():
    torch.manual_seed(0)
    bnn, plan = tiny_plan()
    guide = SharedMixtureGuide(bnn, plan, semantics="hierarchical")
    n = 400_000
    w = flat_draws(guide, n)
    m, cov = plan.means.double(), plan.covs.double()
    # A member of component k: E w = m_k0, Var w = V_00 + E sigma~^2 = V_00 + m_k1^2 + V_11.
    for weight, k in ((1, 0), (3, 1)):
        var = cov[k, 0, 0] + m[k, 1] ** 2 + cov[k, 1, 1]
        assert abs(w[:, weight].mean() - m[k, 0]) < 5 * math.sqrt(var / n)
        assert abs(w[:, weight].var() / var - 1) < 5 * math.sqrt(2 / n)
    # Two members share the component draw: covariance V_00; members of different components: 0.
    cov_same = torch.cov(w[:, [1, 2]].T)[0, 1]
    assert abs(cov_same - cov[0, 0, 0]) < 6 * (cov[0, 0, 0] + m[0, 1] ** 2 + cov[0, 1, 1]) / math.sqrt(n)
    assert abs(torch.corrcoef(w[:, [1, 3]].T)[0, 1]) < 6 / math.sqrt(n)
    # The ellipse weight has the moments of the alpha-mixture of Eq. 7 (a component drawn
    # per weight and per sample): E w = sum a_j m_j0, E w^2 = sum a_j (m_j0^2 + V_j00 + m_j1^2 + V_j11).
    a = plan.ellipse_alphas[0].double()
    mean = (a * m[:, 0]).sum()
    second = (a * (m[:, 0] ** 2 + cov[:, 0, 0] + m[:, 1] ** 2 + cov[:, 1, 1])).sum()
    var = second - mean**2
    assert abs(w[:, 7].mean() - mean) < 5 * math.sqrt(var / n)
    assert abs(w[:, 7].var() / var - 1) < 0.02


def hierarchical_kl_by_monte_carlo(guide, bnn, n):
    """E_z KL(q(w | z) || p(w)) by sampling the component draws; the KL given z in closed form."""
    loc, scale = guide._normal_moments(torch.Size([n]))
    p_loc, p_scale = prior_vectors(bnn)
    per_draw = torch.distributions.kl_divergence(
        torch.distributions.Normal(loc.double(), scale.double()), torch.distributions.Normal(p_loc.double(), p_scale.double())
    ).sum(-1)
    return per_draw.mean().item(), per_draw.std().item() / math.sqrt(n)


@pytest.mark.parametrize("ellipse", [True, False])
def test_hierarchical_kl_is_the_expectation_it_claims(ellipse):
    torch.manual_seed(1)
    bnn, plan = tiny_plan(ellipse)
    guide = SharedMixtureGuide(bnn, plan, semantics="hierarchical")
    closed = guide.kl_divergence().item()
    mc, se = hierarchical_kl_by_monte_carlo(guide, bnn, 200_000)
    if ellipse:  # the ellipse weight's matched Normal is bounded by its alpha-mixture: closed >= mc
        assert closed >= mc - 5 * se
    else:
        assert abs(closed - mc) < 5 * se


def test_hierarchical_kl_bounds_the_kl_of_the_marginal():
    """KL(q(w) || p(w)) <= E_z KL(q(w | z) || p(w)); with one member per component the
    marginal of each weight is 1D, and its density is a Monte-Carlo average over z."""
    torch.manual_seed(2)
    bnn = BayesianNetwork(nn.Linear(1, 1), IIDNormalPrior(0.0, 0.1), Categorical(10))
    plan = SharingPlan(
        site_names=list(bnn.site_shapes), site_shapes=[list(s) for s in bnn.site_shapes.values()],
        means=torch.tensor([[0.05, 0.02], [-0.05, 0.01]]),
        covs=torch.tensor([[[4e-4, 0.0], [0.0, 1e-4]], [[1e-4, 0.0], [0.0, 4e-5]]]), counts=torch.ones(2),
        outlier_index=torch.zeros(0, dtype=torch.long), outlier_loc=torch.zeros(0), outlier_scale=torch.zeros(0),
        inlier_index=torch.tensor([0, 1]), inlier_component=torch.tensor([0, 1], dtype=torch.uint8),
        ellipse_index=torch.zeros(0, dtype=torch.long), ellipse_components=torch.zeros(0, 1, dtype=torch.uint8),
        ellipse_alphas=torch.zeros(0, 1), report={},
    )
    guide = SharedMixtureGuide(bnn, plan, semantics="hierarchical")
    bound = guide.kl_divergence().item()
    n, inner = 4000, 4000
    w = flat_draws(guide, n)
    loc, scale = (t.double() for t in guide._normal_moments(torch.Size([inner])))
    log_q = torch.logsumexp(torch.distributions.Normal(loc[:, None, :], scale[:, None, :]).log_prob(w[None]), 0) - math.log(inner)
    log_p = torch.distributions.Normal(0.0, 0.1).log_prob(w)
    estimates = (log_q - log_p).sum(-1)
    true_kl, se = estimates.mean().item(), estimates.std().item() / math.sqrt(n)
    assert bound > true_kl + 5 * se, "loose by the information w carries about z when Sigma is wide"


def test_hierarchical_kl_meets_independent_kl_as_components_narrow():
    bnn, plan = tiny_plan()
    plan.covs = plan.covs * 1e-8
    hierarchical = SharedMixtureGuide(bnn, plan, semantics="hierarchical").kl_divergence()
    independent = SharedMixtureGuide(bnn, plan, semantics="independent").kl_divergence()
    assert abs(hierarchical.item() - independent.item()) < 1e-4 * abs(independent.item())
