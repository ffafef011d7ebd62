import arviz as az
import pytest
import torch
from torch import nn

from pyro_gbnn import BayesianNetwork, Categorical, IIDNormalPrior, MeanFieldGuide
from pyro_gbnn.diagnostics import to_inference_data


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
