"""Spike-and-slab guide: the closed-form inclusion update against autograd on an exact ELBO,
the KL against Monte Carlo, pruning, SVI and checkpoints."""

import itertools
import math

import pyro
import pytest
import torch
from torch import nn

from pyro_gbnn.bayesian import BayesianNetwork
from pyro_gbnn.elbo import AnalyticKL_ELBO
from pyro_gbnn.guides.mean_field import inverse_softplus
from pyro_gbnn.guides.spike_slab import LOGIT_BOUND, PrunedSpikeSlabGuide, SpikeSlabGuide
from pyro_gbnn.likelihoods import Categorical, Gaussian
from pyro_gbnn.predict import predict, predict_batch
from pyro_gbnn.priors import IIDNormalPrior, LayerwiseNormalPrior, ScaleMixturePrior


def mlp(d_in=4, hidden=5, out=3):
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, out))


@pytest.fixture
def one_thread():
    """Many small tensor ops: a second thread only adds synchronisation on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def set_logits(guide, name, values):
    guide.inclusion_logit[name.replace(".", "/")].copy_(values)


# ---------------------------------------------------------------- exact linear-Gaussian ELBO
# y = X w + eps, eps ~ N(0, s^2), w_j = gamma_j theta_j. Given gamma, w ~ N(gamma mu, diag(gamma sigma^2))
# under q, so E[log p(y | X w)] is exact; enumerating gamma in {0, 1}^d gives the exact ELBO.


def expected_log_likelihood(phi, mu, sigma, X, y, noise):
    n, d = X.shape
    total = torch.zeros((), dtype=X.dtype)
    col_sq = (X * X).sum(0)
    for bits in itertools.product([0.0, 1.0], repeat=d):
        g = torch.tensor(bits, dtype=X.dtype)
        weight = torch.prod(phi**g * (1 - phi) ** (1 - g))
        resid = y - X @ (g * mu)
        sq = resid @ resid + (g * sigma**2 * col_sq).sum()
        total = total + weight * (-0.5 * n * math.log(2 * math.pi * noise**2) - sq / (2 * noise**2))
    return total


def normal_kl(mu, sigma, m0, s0):
    return torch.log(s0 / sigma) + (sigma**2 + (mu - m0) ** 2) / (2 * s0**2) - 0.5


def exact_elbo(logit, mu, sigma, X, y, noise, lam, m0, s0):
    phi = torch.sigmoid(logit)
    bernoulli = phi * (torch.log(phi) - math.log(lam)) + (1 - phi) * (torch.log1p(-phi) - math.log1p(-lam))
    kl = (bernoulli + phi * normal_kl(mu, sigma, m0, s0)).sum()
    return expected_log_likelihood(phi, mu, sigma, X, y, noise) - kl


def grads(logit, mu, sigma, *problem):
    leaves = [t.detach().clone().requires_grad_(True) for t in (logit, mu, sigma)]
    return torch.autograd.grad(exact_elbo(*leaves, *problem), leaves)


@pytest.fixture
def regression():
    torch.manual_seed(1)
    n, d, noise = 8, 3, 1.0
    X = 0.5 * torch.randn(n, d, dtype=torch.float64)
    y = X @ torch.tensor([2.0, -1.0, 0.0], dtype=torch.float64) + noise * torch.randn(n, dtype=torch.float64)
    return X, y, noise


@pytest.mark.parametrize("m0", [0.0, 0.4])
def test_closed_form_update_is_the_coordinate_optimum_of_the_exact_elbo(regression, m0):
    X, y, noise = regression
    d, lam, s0 = X.shape[1], 0.3, 0.8
    problem = (X, y, noise, lam, m0, s0)
    bnn = BayesianNetwork(nn.Linear(d, 1, bias=False).double(), IIDNormalPrior(m0, s0), Gaussian(len(y), noise))
    guide = SpikeSlabGuide(bnn, prior_inclusion=lam, init_inclusion=0.5, init_scale=0.3).double()
    logit = torch.tensor([0.7, -0.4, 1.2], dtype=torch.float64)
    mu = torch.tensor([0.5, -0.2, 0.3], dtype=torch.float64)
    sigma = torch.tensor([0.4, 0.6, 0.3], dtype=torch.float64)
    for i in range(d):
        # (mu_i, sigma_i) at their optimum given the others: the log-likelihood is quadratic in w_i
        phi = torch.sigmoid(logit)
        others = torch.arange(d) != i
        h = (X[:, i] @ X[:, i]) / noise**2
        b = X[:, i] @ (y - X[:, others] @ (phi * mu)[others]) / noise**2
        sigma[i] = (h + 1 / s0**2).rsqrt()
        mu[i] = sigma[i] ** 2 * (b + m0 / s0**2)
        logit[i] = -2.0
        g_logit, g_mu, g_sigma = grads(logit, mu, sigma, *problem)
        assert abs(g_mu[i]) < 1e-10 and abs(g_sigma[i]) < 1e-10
        assert abs(g_logit[i]) > 0.05
        with torch.no_grad():
            guide.loc["weight"].copy_(mu.view(1, d))
            guide.rho["weight"].copy_(inverse_softplus(sigma).view(1, d))
            set_logits(guide, "weight", logit.view(1, d))
        guide.update_inclusion()
        logit[i] = guide.inclusion_logit["weight"][0, i]
        g_logit, g_mu, g_sigma = grads(logit, mu, sigma, *problem)
        assert abs(g_logit[i]) < 1e-10 and abs(g_mu[i]) < 1e-10 and abs(g_sigma[i]) < 1e-10
        # the reduced form equals the general one, logit(lambda) - KL_i + (A_i - B_i), at this optimum
        phi = torch.sigmoid(logit)
        A = expected_log_likelihood(torch.where(~others, 1.0, phi), mu, sigma, X, y, noise)
        B = expected_log_likelihood(torch.where(~others, 0.0, phi), mu, sigma, X, y, noise)
        kl_i = normal_kl(mu[i], sigma[i], m0, s0)
        assert torch.isclose(logit[i], math.log(lam / (1 - lam)) - kl_i + A - B, atol=1e-10)


def test_general_form_is_stationary_for_any_slab(regression):
    X, y, noise = regression
    lam, m0, s0 = 0.2, 0.1, 0.9
    problem = (X, y, noise, lam, m0, s0)
    torch.manual_seed(2)
    logit = torch.randn(3, dtype=torch.float64)
    mu = torch.randn(3, dtype=torch.float64)
    sigma = 0.2 + torch.rand(3, dtype=torch.float64)
    for i in range(3):
        mask = torch.arange(3) == i
        phi = torch.sigmoid(logit)
        A = expected_log_likelihood(torch.where(mask, 1.0, phi), mu, sigma, X, y, noise)
        B = expected_log_likelihood(torch.where(mask, 0.0, phi), mu, sigma, X, y, noise)
        assert abs(grads(logit, mu, sigma, *problem)[0][i]) > 1e-3
        logit[i] = math.log(lam / (1 - lam)) - normal_kl(mu[i], sigma[i], m0, s0) + A - B
        assert abs(grads(logit, mu, sigma, *problem)[0][i]) < 1e-10


def test_update_rate_damps_and_logits_are_clamped():
    bnn = BayesianNetwork(nn.Linear(3, 2), IIDNormalPrior(0.0, 1.0), Categorical(10))
    guide = SpikeSlabGuide(bnn, prior_inclusion=0.2, init_inclusion=0.6, update_rate=0.25)
    old = guide.inclusion_logit["weight"].clone()
    target = guide.inclusion_target("weight")
    guide.after_step(None)
    expected = (0.75 * old + 0.25 * target).clamp(-LOGIT_BOUND, LOGIT_BOUND)
    assert torch.allclose(guide.inclusion_logit["weight"], expected)
    guide = SpikeSlabGuide(bnn, prior_inclusion=0.2)
    for rho in (-30.0, -200.0):  # sigma = 9e-14; sigma underflows to 0
        with torch.no_grad():
            guide.loc["weight"].copy_(torch.tensor([[5.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
            guide.rho["weight"].fill_(rho)
        guide.update_inclusion()
        phi = guide.inclusion("weight")
        bounds = torch.sigmoid(torch.tensor([LOGIT_BOUND, -LOGIT_BOUND]))
        assert phi[0, 0] == bounds[0] and phi[0, 1] == bounds[1]
        assert ((phi > 0) & (phi < 1)).all()
        if rho == -30.0:
            assert torch.isfinite(guide.kl_divergence(bnn))


# ---------------------------------------------------------------- KL on the augmented space


@pytest.mark.parametrize("prior", [IIDNormalPrior(0.2, 0.7), LayerwiseNormalPrior("xavier")])
def test_kl_equals_monte_carlo_over_gamma_and_theta(prior, one_thread):
    bnn = BayesianNetwork(mlp(), prior, Categorical(10))
    lam = 0.3
    guide = SpikeSlabGuide(bnn, prior_inclusion=lam, init_scale=0.3)
    n = 10000
    estimates = torch.zeros(n)
    with torch.no_grad():
        for name, shape in bnn.site_shapes.items():
            set_logits(guide, name, 3 * torch.rand(shape) - 1.5)
            guide.loc[name.replace(".", "/")].normal_()
            phi, mu, sigma = guide.inclusion(name), guide.loc[name.replace(".", "/")], guide.scale(name)
            slab_prior = bnn.prior_distribution(name).base_dist
            gamma = torch.bernoulli(phi.expand((n,) + shape))
            theta = torch.where(gamma.bool(), mu + sigma * torch.randn((n,) + shape), slab_prior.sample((n,)))
            slab_q = torch.distributions.Normal(mu, sigma)
            log_q = torch.where(gamma.bool(), phi.log() + slab_q.log_prob(theta), (1 - phi).log())
            log_p = torch.where(gamma.bool(), math.log(lam) + slab_prior.log_prob(theta), math.log1p(-lam))
            # given gamma = 0, q(theta) = p(theta): that factor cancels and is left out of both
            estimates += (log_q - log_p).flatten(1).sum(1)
    analytic = guide.kl_divergence(bnn).item()
    assert abs(estimates.mean().item() - analytic) < 5 * estimates.std().item() / math.sqrt(n)


# ---------------------------------------------------------------- sampling, estimators, pruning


@pytest.mark.parametrize("estimator", ["local", "flipout"])
def test_every_estimator_falls_back_to_the_drawn_weight(estimator):
    net = mlp()
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    plain = BayesianNetwork(net, IIDNormalPrior(), Categorical(50), estimator="weight")
    other = BayesianNetwork(net, IIDNormalPrior(), Categorical(50), estimator=estimator)
    guide = SpikeSlabGuide(plain, init_inclusion=0.7, init_scale=0.1)
    losses = []
    for bnn in (plain, other):
        pyro.set_rng_seed(5)
        guide.zero_grad()
        loss = AnalyticKL_ELBO(bnn, guide)(x, y)
        loss.backward()
        losses.append(loss.detach())
    assert torch.allclose(losses[0], losses[1], rtol=1e-6)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in guide.parameters())
    assert len(list(guide.parameters())) == 2 * len(plain.site_shapes)  # phi is a buffer, not a parameter


def test_pruned_guide_agrees_with_the_full_one_when_every_weight_is_kept():
    bnn = BayesianNetwork(mlp(), IIDNormalPrior(), Categorical(50))
    guide = SpikeSlabGuide(bnn, prior_inclusion=0.9, init_inclusion=0.999999, init_scale=0.2)
    pruned = guide.prune(0.5)
    assert isinstance(pruned, PrunedSpikeSlabGuide) and pruned.num_kept() == 5 * 4 + 5 + 3 * 5 + 3
    x = torch.randn(7, 4)
    pyro.set_rng_seed(3)
    full = predict_batch(bnn, guide, x, num_samples=8)
    pyro.set_rng_seed(3)
    kept = predict_batch(bnn, pruned, x, num_samples=8)
    assert torch.allclose(full, kept, atol=1e-6)
    loader = [(x, torch.zeros(7, dtype=torch.long))]
    assert torch.allclose(predict(bnn, pruned, loader, num_samples=4).probs.sum(-1), torch.ones(7))


def test_pruning_removes_exactly_the_weights_at_or_below_the_threshold():
    bnn = BayesianNetwork(mlp(), IIDNormalPrior(), Categorical(50))
    guide = SpikeSlabGuide(bnn, prior_inclusion=0.1, init_scale=0.2)
    torch.manual_seed(4)
    for name, shape in bnn.site_shapes.items():
        set_logits(guide, name, torch.randint(-1, 2, shape).float() * 3.0)  # phi in {0.047, 0.5, 0.953}
    pruned = guide.prune(0.5)
    draws = pruned.sample_weights(50)
    total, kept = 0, 0
    for name in bnn.site_shapes:
        keep = guide.inclusion(name) > 0.5
        assert torch.equal(pruned.mask[name.replace(".", "/")], keep)
        assert (draws[name][:, ~keep] == 0).all() and (draws[name][:, keep] != 0).all()
        total, kept = total + keep.numel(), kept + int(keep.sum())
    assert pruned.num_kept() == kept and guide.sparsity(0.5) == pytest.approx(1 - kept / total)
    expected_bytes = 8 * kept + sum(math.ceil(s.numel() / 8) for s in bnn.site_shapes.values())
    assert pruned.size_bytes() == guide.pruned_size_bytes(0.5) == expected_bytes
    assert torch.isfinite(pruned.kl_divergence(bnn))
    with pytest.raises(NotImplementedError, match="kl_divergence"):
        pruned.distribution("0.weight").log_prob(draws["0.weight"][0])


# ---------------------------------------------------------------- SVI


def test_svi_keeps_used_weights_and_sends_an_unused_one_to_the_prior_inclusion(one_thread):
    torch.manual_seed(0)
    n, lam = 256, 0.1
    x = torch.randn(n, 3)
    x[:, 2] = 0.0  # weights reading input 2 cannot affect the likelihood
    y = torch.tanh(2 * x[:, 0]) - x[:, 1] + 0.1 * torch.randn(n)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    pretrain = torch.optim.Adam(net.parameters(), lr=0.05)
    for _ in range(200):
        pretrain.zero_grad()
        ((net(x).squeeze(-1) - y) ** 2).mean().backward()
        pretrain.step()
    bnn = BayesianNetwork(net, IIDNormalPrior(0.0, 1.0), Gaussian(n, 0.1))
    guide = SpikeSlabGuide(bnn, prior_inclusion=lam, init_scale=0.05)
    elbo = AnalyticKL_ELBO(bnn, guide)
    groups = [
        {"params": list(guide.loc_parameters()), "lr": 0.03},
        {"params": list(guide.scale_parameters()), "lr": 0.1},
    ]
    optimizer = torch.optim.Adam(groups, betas=(0.9, 0.99))
    losses = []
    for _ in range(200):
        optimizer.zero_grad()
        loss = elbo(x, y)
        loss.backward()
        optimizer.step()
        guide.after_step(optimizer)
        losses.append(loss.item())
        phi = torch.cat([guide.inclusion(name).flatten() for name in bnn.site_shapes])
        assert ((phi > 0) & (phi < 1)).all()
    assert sum(losses[-20:]) / 20 < sum(losses[:20]) / 20
    first = guide.inclusion("0.weight")
    assert torch.allclose(first[:, 2], torch.full((4,), lam), atol=0.02)
    assert first[:, 0].max() > 0.999 and first[:, 1].max() > 0.999
    assert (guide.inclusion("2.weight") > 0.999).any()
    assert 0 < guide.sparsity(0.5) < 1 and (guide.prune(0.5).mask["0/weight"][:, 2] == 0).all()


# ---------------------------------------------------------------- checkpoints and errors


def test_state_dict_round_trip_restores_inclusion_exactly(tmp_path):
    bnn = BayesianNetwork(mlp(), LayerwiseNormalPrior(), Categorical(50))
    guide = SpikeSlabGuide(bnn, prior_inclusion=0.2)
    with torch.no_grad():
        for p in guide.parameters():
            p.add_(0.3 * torch.randn_like(p))
    guide.update_inclusion()
    torch.save(guide.state_dict(), tmp_path / "guide.pt")
    fresh = SpikeSlabGuide(bnn, prior_inclusion=0.2)
    assert not torch.equal(fresh.inclusion("0.weight"), guide.inclusion("0.weight"))
    fresh.load_state_dict(torch.load(tmp_path / "guide.pt", weights_only=True))
    for name in bnn.site_shapes:
        assert torch.equal(fresh.inclusion(name), guide.inclusion(name))
        assert torch.equal(fresh.scale(name), guide.scale(name))
    assert torch.equal(fresh.kl_divergence(bnn), guide.kl_divergence(bnn))


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5])
def test_inclusion_outside_the_open_unit_interval_is_rejected(bad):
    bnn = BayesianNetwork(nn.Linear(2, 2), IIDNormalPrior(), Categorical(10))
    with pytest.raises(ValueError, match=r"prior_inclusion.*\(0, 1\)"):
        SpikeSlabGuide(bnn, prior_inclusion=bad)
    with pytest.raises(ValueError, match=r"init_inclusion.*\(0, 1\)"):
        SpikeSlabGuide(bnn, init_inclusion=bad)


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5])
def test_update_rate_outside_zero_one_is_rejected(bad):
    bnn = BayesianNetwork(nn.Linear(2, 2), IIDNormalPrior(), Categorical(10))
    with pytest.raises(ValueError, match=r"update_rate.*\(0, 1\]"):
        SpikeSlabGuide(bnn, update_rate=bad)


def test_non_normal_slab_prior_is_rejected():
    bnn = BayesianNetwork(nn.Linear(2, 2), ScaleMixturePrior(), Categorical(10))
    with pytest.raises(ValueError, match=r"Normal prior per weight.*'weight'.*MixtureSameFamily"):
        SpikeSlabGuide(bnn)
