import arviz as az
import numpy as np
import pyro
import pytest
import torch
from torch import nn

from pyro_gbnn import BayesianNetwork, Categorical, IIDNormalPrior, MeanFieldGuide
from pyro_gbnn.arviz_compat import group_names, loo
from pyro_gbnn.diagnostics import khat_reading, to_inference_data, variational_khat
from pyro_gbnn.likelihoods import Gaussian


def test_inference_data_holds_guide_draws_with_the_right_moments():
    bnn = BayesianNetwork(nn.Linear(4, 3), IIDNormalPrior(), Categorical(10))
    guide = MeanFieldGuide(bnn, init_scale=0.5)
    idata = to_inference_data(guide, num_samples=4000, max_weights_per_site=5)
    weight = idata.posterior["weight"]
    assert weight.shape == (1, 4000, 5)
    summary = az.summary(idata, var_names=["bias"], kind="stats")
    assert len(summary) == 3
    assert torch.allclose(torch.tensor(weight.mean(("chain", "draw")).values).double(), guide.loc["weight"].detach().flatten()[:5].double(), atol=0.05)
    per_weight_std = torch.tensor(weight.std(("chain", "draw")).values).double()
    assert torch.allclose(per_weight_std, torch.full((5,), 0.5, dtype=torch.float64), rtol=0.05)


def test_unknown_site_is_named():
    bnn = BayesianNetwork(nn.Linear(4, 3), IIDNormalPrior(), Categorical(10))
    with pytest.raises(KeyError, match="unknown sites"):
        to_inference_data(MeanFieldGuide(bnn), sites=["nope"])


def linear_regression(n=64, d=3, noise=0.5, prior_scale=1.0):
    """y = X w + eps with orthogonal columns: the exact posterior factorises (test_elbo)."""
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(n, d))
    X = q * torch.tensor([2.0, 3.0, 4.0])
    y = X @ torch.tensor([1.0, -0.5, 0.25]) + noise * torch.randn(n)
    precision = (X * X).sum(0) / noise**2 + 1 / prior_scale**2
    mean, std = (X.T @ y / noise**2) / precision, precision.rsqrt()
    bnn = BayesianNetwork(nn.Linear(d, 1, bias=False), IIDNormalPrior(0.0, prior_scale), Gaussian(n, noise))
    return bnn, X, y, mean, std


def guide_at(bnn, mean, std):
    guide = MeanFieldGuide(bnn, init_loc={"weight": mean.view(1, -1)}, init_scale=0.1)
    with torch.no_grad():
        guide.rho["weight"].copy_(torch.log(torch.expm1(std.view(1, -1))))
    return guide


def test_khat_is_good_for_the_exact_posterior_and_poor_for_a_too_narrow_guide():
    bnn, X, y, mean, std = linear_regression()
    exact, ratios = variational_khat(bnn, guide_at(bnn, mean, std), X, y, num_samples=400)
    assert ratios.shape == (400,) and np.ptp(ratios) < 1e-3, "exact q: the ratios are the evidence"
    wider, _ = variational_khat(bnn, guide_at(bnn, mean, 1.2 * std), X, y, num_samples=400)
    assert np.isfinite(wider) and wider < 0.5 and khat_reading(wider).startswith("good")
    narrow, _ = variational_khat(bnn, guide_at(bnn, mean + 2 * std, 0.3 * std), X, y, num_samples=400)
    assert narrow > 0.7 and khat_reading(narrow).startswith("poor")
    assert np.isfinite(exact) and exact < 0.5


def test_khat_refuses_a_guide_without_a_density_over_the_weights():
    from pyro.nn import PyroModule

    class PointGuide(PyroModule):
        def forward(self, *args):
            import pyro.distributions as dist

            return {"weight": pyro.sample("weight", dist.Delta(torch.zeros(1, 3), event_dim=2))}

    bnn, X, y, _, _ = linear_regression()
    with pytest.raises(ValueError, match="no density over its weights"):
        variational_khat(bnn, PointGuide(), X, y, num_samples=30)


def test_inference_data_has_the_predictive_groups_with_named_dims_and_loo_reads_it():
    bnn = BayesianNetwork(nn.Linear(4, 3), IIDNormalPrior(), Categorical(10))
    guide = MeanFieldGuide(bnn, init_scale=0.3)
    x, y = torch.randn(25, 4), torch.randint(0, 3, (25,))
    idata = to_inference_data(guide, num_samples=50, bnn=bnn, data=(x, y))
    assert group_names(idata) >= {"posterior", "log_likelihood", "posterior_predictive", "observed_data"}
    assert idata.log_likelihood["y"].dims == ("chain", "draw", "example") and idata.log_likelihood["y"].shape == (1, 50, 25)
    assert idata.posterior["weight"].dims == ("chain", "draw", "weight_weight")
    assert set(np.unique(idata.posterior_predictive["y"].values)) <= {0, 1, 2}
    assert (idata.observed_data["y"].values == y.numpy()).all()
    # the pointwise log-likelihood is that of the same draws as the posterior group
    w = torch.tensor(idata.posterior["weight"].values[0, 7]).view(3, 4).float()
    b = torch.tensor(idata.posterior["bias"].values[0, 7]).float()
    expected = (x @ w.T + b).log_softmax(-1).gather(-1, y.view(-1, 1)).squeeze(-1)
    assert np.allclose(idata.log_likelihood["y"].values[0, 7], expected.numpy(), atol=1e-5)
    result = loo(idata)
    assert np.isfinite(result.elpd) and result.elpd < 0 and result.pareto_k.shape == (25,)
    with pytest.raises(ValueError, match="both bnn and data"):
        to_inference_data(guide, bnn=bnn)


def test_inference_data_of_a_2dgbnn_guide_has_component_draws():
    from pyro_gbnn.guides.shared_mixture import SharedMixtureGuide
    from tests.test_shared_mixture import make_plan, small_bnn

    bnn = small_bnn()
    guide = SharedMixtureGuide(bnn, make_plan(bnn))
    idata = to_inference_data(guide, num_samples=3000)
    component = idata.posterior["component"]
    assert component.dims == ("chain", "draw", "component", "coordinate")
    assert component.shape == (1, 3000, guide.num_components, 2)
    centre_mu = guide.centre_mu.detach().numpy()
    assert np.allclose(component.mean(("chain", "draw")).values[:, 0], centre_mu, atol=5 * guide.chol_log_00.exp().max().item() / np.sqrt(3000))


def test_inference_data_of_a_run_folder_holds_its_final_model_and_a_test_subset(fake_mnist, tmp_path):
    from pyro_gbnn import pipeline
    from tests.conftest import tiny_config

    pipeline.run_fit(tiny_config(fake_mnist, "mean-field"), tmp_path / "run")
    idata = to_inference_data(tmp_path / "run", num_samples=30)
    assert group_names(idata) >= {"posterior", "log_likelihood", "posterior_predictive", "observed_data"}
    assert idata.log_likelihood["y"].shape == (1, 30, 128), "the whole (fake) test set: fewer than 1,000 images"
    _, bnn, guide = pipeline.load_run_model(tmp_path / "run")
    same = to_inference_data(guide, num_samples=30)
    assert np.array_equal(idata.posterior["net.1.weight"].values, same.posterior["net.1.weight"].values)
