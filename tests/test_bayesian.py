"""Converter, priors and guide: sites, shapes, names, errors."""

import math

import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from torch import nn

from pyro_gbnn.bayesian import BayesianNetwork
from pyro_gbnn.errors import UsageError
from pyro_gbnn.guides import MeanFieldGuide
from pyro_gbnn.likelihoods import Categorical
from pyro_gbnn.priors import IIDNormalPrior, LayerwiseNormalPrior, Prior, ScaleMixturePrior
from pyro_gbnn.registry import build_prior


def small_net():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def test_sites_named_like_parameters_and_norm_layers_stay_deterministic():
    net = small_net()
    bnn = BayesianNetwork(net, IIDNormalPrior(), Categorical(10))
    assert list(bnn.site_shapes) == ["0.weight", "0.bias", "4.weight", "4.bias"]
    trace = poutine.trace(bnn.model).get_trace(torch.randn(2, 1, 6, 6), torch.tensor([0, 1]))
    latent = [n for n, s in trace.nodes.items() if s["type"] == "sample" and not s["is_observed"] and n != "data"]
    assert latent == list(bnn.site_shapes)
    assert [n for n, _ in bnn.named_parameters()] == ["net.1.weight", "net.1.bias"]
    assert all(p.requires_grad for p in net.parameters()), "the user's network is left untouched"
    bnn_all = BayesianNetwork(net, IIDNormalPrior(), Categorical(10), bayesian_norm=True)
    assert "1.weight" in bnn_all.site_shapes


def test_prior_draws_differ_and_have_prior_scale():
    bnn = BayesianNetwork(nn.Linear(200, 100), IIDNormalPrior(scale=0.5), Categorical(10))
    w1 = poutine.trace(bnn).get_trace(torch.zeros(1, 200)).nodes["weight"]["value"]
    w2 = poutine.trace(bnn).get_trace(torch.zeros(1, 200)).nodes["weight"]["value"]
    assert not torch.equal(w1, w2)
    assert abs(w1.std().item() - 0.5) < 0.02


def test_layerwise_prior_scale_follows_fan_in():
    layer = nn.Conv2d(8, 16, 3)
    prior = LayerwiseNormalPrior("radford").prior_dist("w", layer, layer.weight)
    assert prior.event_shape == layer.weight.shape
    assert torch.allclose(prior.base_dist.scale, torch.tensor(1 / math.sqrt(8 * 9)))
    bias_prior = LayerwiseNormalPrior("kaiming").prior_dist("b", layer, layer.bias)
    assert torch.allclose(bias_prior.base_dist.scale, torch.tensor(math.sqrt(2 / (8 * 9))))


def test_scale_mixture_prior_density():
    layer = nn.Linear(3, 2)
    prior = ScaleMixturePrior(pi=0.25, sigma1=1.0, sigma2=0.1).prior_dist("w", layer, layer.weight)
    w = torch.randn(2, 3)
    expected = torch.log(
        0.25 * dist.Normal(0, 1.0).log_prob(w).exp() + 0.75 * dist.Normal(0, 0.1).log_prob(w).exp()
    ).sum()
    assert torch.allclose(prior.log_prob(w), expected, atol=1e-5)


def test_custom_prior_is_one_small_class():
    class LaplacePrior(Prior):
        def __init__(self, scale=1.0):
            self.scale = scale

        def prior_dist(self, name, module, param):
            return dist.Laplace(torch.zeros_like(param), self.scale).to_event(param.dim())

    bnn = BayesianNetwork(nn.Linear(3, 2), LaplacePrior(0.3), Categorical(10))
    assert isinstance(bnn.prior_distribution("weight").base_dist, dist.Laplace)


def test_build_prior_errors_name_the_problem():
    with pytest.raises(UsageError, match="unknown prior 'laplace'"):
        build_prior({"class": "laplace"})
    with pytest.raises(UsageError, match="cannot import prior class"):
        build_prior({"class": "no_such_pkg.Prior"})
    with pytest.raises(UsageError, match="must subclass pyro_gbnn.priors.Prior"):
        build_prior({"class": "torch.nn.Linear"})
    with pytest.raises(UsageError, match="failed in its __init__ .*IIDNormalPrior scale must be > 0"):
        build_prior({"class": "iid_normal", "args": {"scale": -1}})
    assert isinstance(build_prior({"class": "pyro_gbnn.priors.IIDNormalPrior"}), IIDNormalPrior)


def test_guide_built_eagerly_from_pretrained_weights_with_small_scales():
    net = small_net()
    bnn = BayesianNetwork(net, IIDNormalPrior(), Categorical(10))
    guide = MeanFieldGuide(bnn)
    assert torch.equal(guide.loc["0/weight"], net[0].weight.detach())
    scale = guide.scale("0.weight")
    bound = 0.01 * math.sqrt(6 / (9 + 36))
    assert (scale > 0).all() and (scale <= bound + 1e-6).all()
    assert (guide.scale("4.bias") < 0.01).all()
    n = sum(s.numel() for s in bnn.site_shapes.values())
    assert sum(p.numel() for p in guide.parameters()) == 2 * n
    draws = guide.sample_weights(5)
    assert draws["4.weight"].shape == (5, 3, 64)


def test_guide_state_dict_round_trip_before_any_data():
    bnn = BayesianNetwork(small_net(), IIDNormalPrior(), Categorical(10))
    a, b = MeanFieldGuide(bnn, init_scale=0.1), MeanFieldGuide(bnn, init_scale=0.2)
    b.load_state_dict(a.state_dict())
    for name in bnn.site_shapes:
        assert torch.equal(a.scale(name), b.scale(name))


def test_bad_estimator_and_prior_are_rejected():
    with pytest.raises(ValueError, match="estimator 'lrt' is unknown"):
        BayesianNetwork(nn.Linear(2, 2), IIDNormalPrior(), Categorical(1), estimator="lrt")
    with pytest.raises(TypeError, match="must be a pyro_gbnn.priors.Prior"):
        BayesianNetwork(nn.Linear(2, 2), dist.Normal(0, 1), Categorical(1))


def test_only_layers_with_sites_become_pyro_modules_and_a_reused_layer_draws_once():
    from pyro.nn import PyroModule

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))

        def forward(self, x):
            return self.body(self.body(x))

    bnn = BayesianNetwork(Twice(), IIDNormalPrior(), Categorical(10))
    converted = {name for name, m in bnn.net.named_modules() if isinstance(m, PyroModule)}
    assert converted == {"body.0"}, "containers and deterministic layers stay plain nn.Modules"
    x = torch.randn(4, 3)
    trace = poutine.trace(bnn).get_trace(x)
    assert [n for n, s in trace.nodes.items() if s["type"] == "sample"] == ["body.0.weight", "body.0.bias"]
    w, b = trace.nodes["body.0.weight"]["value"], trace.nodes["body.0.bias"]["value"]
    bn = bnn.net.body[1]
    with torch.no_grad():
        expected = bn(torch.nn.functional.linear(bn(torch.nn.functional.linear(x, w, b)), w, b))
    assert torch.allclose(trace.nodes["_RETURN"]["value"], expected), "both uses of the layer see one draw"
    bnn_norm = BayesianNetwork(Twice(), IIDNormalPrior(), Categorical(10), bayesian_norm=True)
    assert {n for n, m in bnn_norm.net.named_modules() if isinstance(m, PyroModule)} == {"body.0", "body.1"}
