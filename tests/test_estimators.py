"""Local reparameterization and flipout reproduce the analytic output mean and variance."""

import pytest
import torch
import torch.nn.functional as F
from pyro import poutine
from torch import nn

from pyro_gbnn.bayesian import BayesianNetwork
from pyro_gbnn.guides import MeanFieldGuide
from pyro_gbnn.likelihoods import Categorical
from pyro_gbnn.priors import IIDNormalPrior
from pyro_gbnn.reparameterization import record_weight_distributions


def draw_outputs(bnn, guide, x):
    with record_weight_distributions():
        trace = poutine.trace(guide).get_trace()
        return poutine.replay(bnn, trace=trace)(x)


def analytic_moments(guide, op, x, bias_shape):
    loc_w, scale_w = guide.loc["weight"], guide.scale("weight")
    loc_b, scale_b = guide.loc["bias"], guide.scale("bias")
    mean = op(x, loc_w) + loc_b.view(bias_shape)
    var = op(x * x, scale_w**2) + (scale_b**2).view(bias_shape)
    return mean, var


# layer, input shape, op, how the bias [F] lines up with the output's features
CASES = {
    "linear": (lambda: nn.Linear(5, 3), (1, 5), F.linear, (-1,)),
    "linear_3d": (lambda: nn.Linear(5, 3), (1, 4, 5), F.linear, (-1,)),  # [B, T, D], a transformer's MLP
    "conv": (lambda: nn.Conv2d(2, 3, 3, padding=1), (1, 2, 4, 4), lambda x, w: F.conv2d(x, w, padding=1), (-1, 1, 1)),
}


@pytest.mark.parametrize("estimator", ["weight", "local", "flipout"])
@pytest.mark.parametrize("layer", list(CASES))
def test_output_moments_match_closed_form(estimator, layer):
    make, shape, op, bias_shape = CASES[layer]
    bnn = BayesianNetwork(make(), IIDNormalPrior(), Categorical(1), estimator=estimator)
    guide = MeanFieldGuide(bnn, init_scale=0.3)
    with torch.no_grad():
        guide.rho["bias"].fill_(-1.0)
    x = torch.randn(shape)
    draws, per_call = 6000, 4
    with torch.no_grad():
        outs = torch.cat([draw_outputs(bnn, guide, x.expand(per_call, *shape[1:])) for _ in range(draws // per_call)])
        mean, var = analytic_moments(guide, op, x, bias_shape)
    # Rows of one call share a weight draw (weight, flipout): count calls, not rows, so the
    # bounds are conservative. Standard errors of a Gaussian's sample mean and variance, 5 sigma.
    n = draws // per_call
    assert ((outs.mean(0) - mean[0]).abs() <= 5 * (var[0] / n).sqrt()).all()
    assert ((outs.var(0) - var[0]).abs() <= 5 * var[0] * (2 / (n - 1)) ** 0.5 + 1e-6).all()


def pre_change_output(estimator, guide, trace, op, x):
    """The estimators as written before the bias learned its feature dim: bias on dim 1."""
    bias_view = (-1,) + (1,) * (x.dim() - 2)
    loc_w, scale_w = guide.loc["weight"], guide.scale("weight")
    bias = trace.nodes["bias"]["value"]
    mean = op(x, loc_w)
    if estimator == "local":
        mean = mean + guide.loc["bias"].view(bias_view)
        var = op(x * x, scale_w * scale_w) + (guide.scale("bias") * guide.scale("bias")).view(bias_view)
        return torch.addcmul(mean, (var + 1e-16).sqrt(), torch.randn_like(mean))
    from pyro_gbnn.reparameterization import rademacher

    sign_in = rademacher(x.shape, x)
    perturbed = op(x * sign_in, trace.nodes["weight"]["value"] - loc_w)
    sign_out = rademacher(mean.shape, mean)
    return torch.addcmul(mean, perturbed, sign_out) + bias.view(bias_view)


@pytest.mark.parametrize("estimator", ["local", "flipout"])
@pytest.mark.parametrize("layer, shape", [("linear", (6, 5)), ("conv", (3, 2, 4, 4))])
def test_2d_linear_and_conv_outputs_are_bit_identical_to_the_bias_on_dim_1(estimator, layer, shape):
    make, _, op, _ = CASES[layer]
    bnn = BayesianNetwork(make(), IIDNormalPrior(), Categorical(1), estimator=estimator)
    guide = MeanFieldGuide(bnn, init_scale=0.3)
    x = torch.randn(shape)
    with torch.no_grad():
        torch.manual_seed(5)
        out = draw_outputs(bnn, guide, x)
        torch.manual_seed(5)
        trace = poutine.trace(guide).get_trace()
        expected = pre_change_output(estimator, guide, trace, op, x)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("estimator", ["local", "flipout"])
def test_positions_of_a_sequence_are_decorrelated_like_examples(estimator):
    bnn = BayesianNetwork(nn.Linear(4, 1, bias=False), IIDNormalPrior(), Categorical(1), estimator=estimator)
    guide = MeanFieldGuide(bnn, init_scale=1.0)
    with torch.no_grad():
        guide.loc["weight"].zero_()
        out = draw_outputs(bnn, guide, torch.ones(1, 4000, 4)).squeeze(-1)[0]
    # one weight per example would make every position of the sequence identical
    corr = torch.corrcoef(torch.stack([out[::2], out[1::2]]))[0, 1]
    assert abs(corr) < 0.1


def test_local_draws_are_independent_across_examples_and_flipout_decorrelates():
    bnn = BayesianNetwork(nn.Linear(4, 1, bias=False), IIDNormalPrior(), Categorical(1), estimator="local")
    guide = MeanFieldGuide(bnn, init_scale=1.0)
    x = torch.ones(4000, 4)
    with torch.no_grad():
        with torch.no_grad():
            guide.loc["weight"].zero_()
        out = draw_outputs(bnn, guide, x).squeeze(-1)
    # one shared weight draw would make every row identical
    corr = torch.corrcoef(torch.stack([out[::2], out[1::2]]))[0, 1]
    assert abs(corr) < 0.1
    bnn.net.estimator = "flipout"
    with torch.no_grad():
        out = draw_outputs(bnn, guide, x).squeeze(-1)
    corr = torch.corrcoef(torch.stack([out[::2], out[1::2]]))[0, 1]
    assert abs(corr) < 0.1


def test_estimators_fall_back_to_drawn_weights_without_a_record():
    bnn = BayesianNetwork(nn.Linear(3, 2), IIDNormalPrior(), Categorical(1), estimator="local")
    guide = MeanFieldGuide(bnn, init_scale=0.5)
    trace = poutine.trace(guide).get_trace()
    x = torch.randn(7, 3)
    out = poutine.replay(bnn, trace=trace)(x)
    expected = F.linear(x, trace.nodes["weight"]["value"], trace.nodes["bias"]["value"])
    assert torch.allclose(out, expected)


def test_vectorised_and_looped_predictions_agree():
    import pyro

    from pyro_gbnn.predict import predict_batch

    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4))
    bnn = BayesianNetwork(net, IIDNormalPrior(), Categorical(10), estimator="local")
    guide = MeanFieldGuide(bnn, init_scale=0.2)
    bnn.eval()
    x = torch.randn(5, 1, 6, 6)
    pyro.set_rng_seed(1)
    looped = predict_batch(bnn, guide, x, num_samples=7, vectorize=False)
    pyro.set_rng_seed(1)
    vectorised = predict_batch(bnn, guide, x, num_samples=7, sample_chunk=3, vectorize=True)
    assert looped.shape == (7, 5, 4)
    assert torch.allclose(looped, vectorised, atol=1e-5)
    assert not torch.allclose(looped[0], looped[1]), "draws differ"


@pytest.mark.parametrize("estimator", ["local", "flipout"])
@pytest.mark.parametrize("shape", [(5, 3), (5, 4, 3)])
def test_non_normal_guide_draws_are_used_as_drawn_not_replaced_by_the_prior(estimator, shape):
    import pyro
    import pyro.distributions as dist

    bnn = BayesianNetwork(nn.Linear(3, 2), IIDNormalPrior(), Categorical(1), estimator=estimator)
    weight, bias = torch.randn(2, 3, requires_grad=True), torch.randn(2)

    def delta_guide():
        pyro.sample("weight", dist.Delta(weight, event_dim=2))
        pyro.sample("bias", dist.Delta(bias, event_dim=1))

    x = torch.randn(shape)
    with record_weight_distributions():
        trace = poutine.trace(delta_guide).get_trace()
        out = poutine.replay(bnn, trace=trace)(x)
    assert torch.allclose(out, F.linear(x, weight, bias))
    out.sum().backward()
    assert weight.grad is not None


def test_flipout_signs_are_the_bits_of_uniform_random_bytes():
    """Eight fair signs per random byte (least significant bit first), in the tensor's dtype."""
    from pyro_gbnn.reparameterization import rademacher

    like = torch.zeros(3, dtype=torch.float64)
    torch.manual_seed(11)
    signs = rademacher(torch.Size([64, 131]), like)
    torch.manual_seed(11)
    packed = torch.randint(0, 256, ((64 * 131 + 7) // 8,), dtype=torch.uint8)
    bits = torch.tensor([(int(b) >> k) & 1 for b in packed for k in range(8)])[: 64 * 131]
    assert signs.dtype == torch.float64 and torch.equal(signs.view(-1), bits.double() * 2 - 1)
    many = rademacher(torch.Size([1_000_000]), like)
    assert abs(float(many.mean())) < 5e-3 and abs(float((many[1:] * many[:-1]).mean())) < 5e-3

def test_sampled_gaussian_gradients_are_those_of_mean_plus_sqrt_var_times_its_noise():
    from pyro_gbnn.reparameterization import sample_gaussian

    def draw(mean, var):
        torch.manual_seed(0)
        return sample_gaussian(mean, var)

    mean = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    var = (torch.rand(4, 3, dtype=torch.float64) + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(draw, (mean, var))
    torch.manual_seed(0)
    eps = torch.randn(4, 3, dtype=torch.float64)
    assert torch.allclose(draw(mean, var), mean + (var + 1e-16).sqrt() * eps)
    per_feature_var = torch.rand(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(draw, (mean, per_feature_var)), "a variance that broadcasts"
