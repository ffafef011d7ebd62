"""The ELBO: closed-form KL against Monte Carlo, Pyro's TraceMeanField_ELBO, and a conjugate posterior."""

import math

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import TraceMeanField_ELBO
from torch import nn

from pyro_gbnn.bayesian import BayesianNetwork
from pyro_gbnn.elbo import AnalyticKL_ELBO, trace_kl
from pyro_gbnn.guides import MeanFieldGuide
from pyro_gbnn.likelihoods import Categorical, Gaussian
from pyro_gbnn.priors import IIDNormalPrior, LayerwiseNormalPrior, ScaleMixturePrior


def kl_of(bnn, guide):
    guide_trace = poutine.trace(guide).get_trace()
    model_trace = poutine.trace(poutine.replay(bnn, trace=guide_trace)).get_trace(torch.zeros(1, 6))
    return trace_kl(model_trace, guide_trace)


def monte_carlo_kl(bnn, guide, n):
    """Per-draw log q(w) - log p(w) summed over sites, for n draws w ~ q."""
    estimates = torch.zeros(n)
    for name in bnn.site_shapes:
        q, p = guide.distribution(name), bnn.prior_distribution(name)
        w = q.sample((n,))
        estimates += q.log_prob(w) - p.log_prob(w)
    return estimates


@pytest.mark.parametrize("prior", [IIDNormalPrior(0.1, 0.7), LayerwiseNormalPrior("xavier")])
def test_closed_form_kl_equals_monte_carlo(prior):
    bnn = BayesianNetwork(nn.Linear(6, 4), prior, Categorical(10))
    guide = MeanFieldGuide(bnn, init_scale=0.3)
    analytic = kl_of(bnn, guide).item()
    n = 20000
    mc = monte_carlo_kl(bnn, guide, n)
    tolerance = 5 * mc.std().item() / math.sqrt(n)
    assert abs(mc.mean().item() - analytic) < tolerance


def test_kl_falls_back_to_one_sample_for_scale_mixture_and_is_unbiased():
    bnn = BayesianNetwork(nn.Linear(6, 4), ScaleMixturePrior(0.5, 1.0, 0.05), Categorical(10))
    guide = MeanFieldGuide(bnn, init_scale=0.2)
    estimates = torch.stack([kl_of(bnn, guide).detach() for _ in range(3000)])
    n = 50000
    mc = monte_carlo_kl(bnn, guide, n)
    tolerance = 5 * (estimates.std() / math.sqrt(len(estimates))).item() + 5 * (mc.std() / math.sqrt(n)).item()
    assert abs(estimates.mean().item() - mc.mean().item()) < tolerance


def test_loss_equals_pyro_trace_mean_field_elbo():
    bnn = BayesianNetwork(nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)), IIDNormalPrior(), Categorical(100))
    guide = MeanFieldGuide(bnn, init_scale=0.1)
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    pyro.set_rng_seed(3)
    ours = AnalyticKL_ELBO(bnn, guide)(x, y)
    pyro.set_rng_seed(3)
    pyros = TraceMeanField_ELBO()(bnn.model, guide)(x, y)
    assert torch.allclose(ours, pyros, rtol=1e-6)


def test_likelihood_is_scaled_to_the_data_set_once():
    bnn = BayesianNetwork(nn.Linear(5, 3), IIDNormalPrior(), Categorical(1000))
    guide = MeanFieldGuide(bnn, init_scale=1e-6)
    x, y = torch.randn(10, 5), torch.randint(0, 3, (10,))
    terms = AnalyticKL_ELBO(bnn, guide).terms(x, y)
    logits = x @ guide.loc["weight"].T + guide.loc["bias"]
    expected = 100 * torch.distributions.Categorical(logits=logits).log_prob(y).sum()
    assert torch.allclose(terms.expected_log_likelihood, expected, rtol=1e-3)


def test_gradients_reach_every_guide_parameter():
    bnn = BayesianNetwork(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 2)), IIDNormalPrior(), Categorical(10), estimator="local")
    guide = MeanFieldGuide(bnn, init_scale=0.1)
    AnalyticKL_ELBO(bnn, guide)(torch.randn(3, 1, 4, 4), torch.tensor([0, 1, 1])).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in guide.parameters())


def test_svi_recovers_the_exact_posterior_of_bayesian_linear_regression():
    """y = X w + eps, eps ~ N(0, s^2), w ~ N(0, a^2 I). With orthogonal columns the exact
    posterior factorises, so the mean-field optimum is the exact posterior:
    precision_i = |X_i|^2 / s^2 + 1 / a^2, mean_i = (X_i . y / s^2) / precision_i."""
    torch.manual_seed(0)
    n, d, noise, prior_scale = 64, 3, 0.5, 1.0
    q, _ = torch.linalg.qr(torch.randn(n, d))
    X = q * torch.tensor([2.0, 3.0, 4.0])
    y = X @ torch.tensor([1.0, -0.5, 0.25]) + noise * torch.randn(n)
    precision = (X * X).sum(0) / noise**2 + 1 / prior_scale**2
    exact_mean = (X.T @ y / noise**2) / precision
    exact_std = precision.rsqrt()

    bnn = BayesianNetwork(nn.Linear(d, 1, bias=False), IIDNormalPrior(0.0, prior_scale), Gaussian(n, noise), estimator="local")
    guide = MeanFieldGuide(bnn, init_loc={"weight": torch.zeros(1, d)}, init_scale=0.1)
    elbo = AnalyticKL_ELBO(bnn, guide, num_particles=4)
    optimizer = torch.optim.Adam(guide.parameters(), lr=0.02)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1.0 if t < 800 else 0.1 if t < 1400 else 0.02)
    for _ in range(1800):
        optimizer.zero_grad()
        elbo(X, y).backward()
        optimizer.step()
        schedule.step()
    loc = guide.loc["weight"].detach().squeeze(0)
    std = guide.scale("weight").detach().squeeze(0)
    assert torch.allclose(loc, exact_mean, atol=0.15 * exact_std.max().item())
    assert torch.allclose(std, exact_std, rtol=0.1)


def test_guide_run_without_its_pyro_context_gives_the_same_loss_unless_it_needs_the_context():
    import pyro.distributions as dist
    from pyro.nn import PyroModule, PyroSample

    from pyro_gbnn.elbo import _guide_callable

    bnn = BayesianNetwork(nn.Linear(4, 3), IIDNormalPrior(), Categorical(50), estimator="local")
    guide = MeanFieldGuide(bnn, init_scale=0.2)
    assert _guide_callable(guide) == guide.forward
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    elbo = AnalyticKL_ELBO(bnn, guide)
    pyro.set_rng_seed(5)
    direct = elbo(x, y)
    handle = guide.register_forward_hook(lambda *args: None)  # a hook: the guide is called as usual
    assert _guide_callable(guide) is guide
    pyro.set_rng_seed(5)
    called = elbo(x, y)
    handle.remove()
    assert torch.equal(direct, called)

    class SampleAttributeGuide(PyroModule):
        def __init__(self):
            super().__init__()
            self.weight = PyroSample(dist.Normal(torch.zeros(3, 4), 0.1).to_event(2))

        def forward(self, *args):
            return {"weight": self.weight}

    sample_guide = SampleAttributeGuide()
    assert _guide_callable(sample_guide) is sample_guide
