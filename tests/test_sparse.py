"""Sparse weights (pyro_gbnn.sparse): the CSR Linear kernel gives the dense layer's outputs and
gradients under every estimator, and SSVI uses it only where allowed and never when the
gradient-addition rule needs the dense gradient."""

import pyro
import pytest
import torch
from pyro import poutine
from torch import nn

import pyro_gbnn.bayesian as bayesian
from pyro_gbnn.bayesian import BayesianNetwork
from pyro_gbnn.elbo import AnalyticKL_ELBO
from pyro_gbnn.guides.sparse_subspace import SparseSubspaceGuide
from pyro_gbnn.likelihoods import Categorical
from pyro_gbnn.priors import IIDNormalPrior
from pyro_gbnn.reparameterization import record_weight_distributions


class TokenMean(nn.Module):
    """Logits of a sequence [B, T, D]: the mean over positions (Linear layers see 3-D inputs)."""

    def forward(self, x):
        return x.mean(-2) if x.dim() == 3 else x


def network(estimator, max_density, **kwargs):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3), TokenMean())
    bnn = BayesianNetwork(net, IIDNormalPrior(), Categorical(64), estimator=estimator)
    guide = SparseSubspaceGuide(bnn, 0.3, init_scale=0.2, sparse_kernel_max_density=max_density, **kwargs)
    return bnn, guide


@pytest.fixture
def kernel_calls(monkeypatch):
    calls = []
    original = bayesian.sparse_linear

    def counted(*args, **kwargs):
        calls.append(args[-1])
        return original(*args, **kwargs)

    monkeypatch.setattr(bayesian, "sparse_linear", counted)
    return calls


@pytest.mark.parametrize("estimator", ["weight", "local", "flipout"])
@pytest.mark.parametrize("tokens", [False, True])
def test_sparse_kernel_matches_the_dense_layer_outputs_and_gradients(estimator, tokens, kernel_calls):
    x = torch.randn(8, 5, 12) if tokens else torch.randn(8, 12)
    y = torch.randint(0, 3, (8,))
    results = []
    for max_density in (0.0, 1.0):
        bnn, guide = network(estimator, max_density, addition="random")
        pyro.set_rng_seed(3)
        loss = AnalyticKL_ELBO(bnn, guide)(x, y)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in guide.named_parameters()}))
    assert kernel_calls == [estimator, estimator], "both Linear layers ran the sparse kernel, once"
    (dense_loss, dense_grads), (sparse_loss, sparse_grads) = results
    assert torch.allclose(dense_loss, sparse_loss, rtol=1e-5)
    for name, grad in dense_grads.items():
        assert torch.allclose(grad, sparse_grads[name], rtol=1e-4, atol=1e-5), name


def test_only_linear_weights_at_or_below_the_density_use_the_kernel():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 4))
    bnn = BayesianNetwork(net, IIDNormalPrior(), Categorical(1))
    assert SparseSubspaceGuide(bnn, 0.5, sparse_kernel_max_density=0.5).sparse_kernel_sites == {"2.weight"}
    assert SparseSubspaceGuide(bnn, 0.5, sparse_kernel_max_density=0.4).sparse_kernel_sites == set()
    assert SparseSubspaceGuide(bnn, 0.5).sparse_kernel_sites == set()
    with pytest.raises(ValueError, match=r"sparse_kernel_max_density must be a number in \[0, 1\]"):
        SparseSubspaceGuide(bnn, 0.5, sparse_kernel_max_density=2)


def test_steps_that_need_the_dense_gradient_run_dense_kernels(kernel_calls):
    bnn, guide = network("local", 1.0, addition="gradient", update_every=2, total_steps=100)
    x, y = torch.randn(8, 12), torch.randint(0, 3, (8,))
    elbo = AnalyticKL_ELBO(bnn, guide)
    optimizer = torch.optim.Adam(guide.parameters(), lr=1e-2)
    for step in range(1, 5):
        optimizer.zero_grad()
        elbo(x, y).backward()
        optimizer.step()
        due = step % 2 == 0
        assert (len(kernel_calls) == 0) == due, f"step {step}"
        assert bool(guide._grads) == due
        kernel_calls.clear()
        guide.after_step(optimizer)


def test_prediction_draws_of_a_sparse_kernel_site_are_dense_and_exactly_zero_off_the_subspace():
    bnn, guide = network("weight", 1.0)
    with record_weight_distributions():
        trace = poutine.trace(guide).get_trace()
        out = poutine.replay(bnn, trace=trace)(torch.randn(4, 12))
    assert out.shape == (4, 3)
    draws = guide.sample_weights(7)
    for name, value in draws.items():
        assert value.shape == (7, *guide.site_shapes[name]) and (value[:, ~guide.active_mask(name)] == 0).all()
