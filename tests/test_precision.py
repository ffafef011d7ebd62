"""Mixed precision: the network's forward under autocast, the KL and every parameter in fp32."""

from __future__ import annotations

import json

import pytest
import torch

import pyro_gbnn as pg
from pyro_gbnn import pipeline
from pyro_gbnn.errors import UsageError
from pyro_gbnn.train import _autocast
from tests.conftest import tiny_config


class _RecordingGuide(pg.MeanFieldGuide):
    """A mean-field guide with a closed-form KL that notes whether autocast was on while it ran."""

    autocast_seen: list[bool] = []

    def kl_divergence(self, bnn):
        self.autocast_seen.append(torch.is_autocast_enabled("cpu"))
        return sum(torch.distributions.kl_divergence(self.distribution(n), bnn.prior_distribution(n)).sum() for n in self.site_shapes)


def _elbo():
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    bnn = pg.BayesianNetwork(net, pg.IIDNormalPrior(0.0, 1.0), pg.Categorical(100), estimator="weight")
    return pg.AnalyticKL_ELBO(bnn, _RecordingGuide(bnn))


def test_under_bf16_autocast_the_network_runs_in_bf16_and_the_kl_in_fp32():
    elbo = _elbo()
    x, y = torch.randn(5, 12), torch.randint(0, 3, (5,))
    reference = elbo.terms(x, y).kl
    with _autocast(torch.device("cpu"), "bf16"):
        terms = elbo.terms(x, y)
    assert terms.logits.dtype == torch.bfloat16, "the network's matmuls ran in bf16"
    assert _RecordingGuide.autocast_seen == [False, False], "the guide's KL runs with autocast off"
    assert terms.kl.dtype == torch.float32 and torch.equal(terms.kl, reference)
    terms.loss.backward()
    assert all(p.grad.dtype == torch.float32 for p in elbo.parameters())


def test_an_unknown_precision_is_named():
    with pytest.raises(UsageError, match="unknown precision 'fp8'; use one of fp32, bf16, fp16"):
        _autocast(torch.device("cpu"), "fp8")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_run_trains_in_half_precision_and_records_it(fake_mnist, tmp_path, precision):
    metrics = pipeline.run_fit(tiny_config(fake_mnist, "mean-field", [f"precision={precision}"]), tmp_path / "run")
    assert metrics["accuracy"] > 0.3, "learns the easy fake MNIST as in fp32"
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["run"]["precision"] == precision
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert all(v.dtype == torch.float32 for v in state["outputs"]["mean_field"]["elbo"].values() if v.is_floating_point())
