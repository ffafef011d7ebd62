"""The ArviZ calls of the diagnostics, checked against closed forms; they must hold on
ArviZ 0.x (what CI installs on Python 3.11) and 1.x (Python >= 3.12) alike."""

import numpy as np
import pytest

from pyro_gbnn import arviz_compat


def groups(num_draws=200, num_examples=30, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "posterior": {"w": rng.normal(size=(1, num_draws, 4)), "component": rng.normal(size=(1, num_draws, 3, 2))},
        # each example's log-likelihood nearly the same under every draw
        "log_likelihood": {"y": -rng.random((1, 1, num_examples)) + 1e-6 * rng.standard_normal((1, num_draws, num_examples))},
        "observed_data": {"y": rng.integers(0, 3, num_examples)},
    }


def test_from_groups_keeps_groups_dims_and_values():
    g = groups()
    dims = {"w": ["w_weight"], "component": ["component", "coordinate"], "y": ["example"]}
    data = arviz_compat.from_groups(g, dims, {"coordinate": ["mu", "sigma"]})
    assert data.posterior["w"].dims == ("chain", "draw", "w_weight")
    assert data.posterior["component"].dims == ("chain", "draw", "component", "coordinate")
    assert list(data.posterior["coordinate"].values) == ["mu", "sigma"]
    assert data.log_likelihood["y"].dims == ("chain", "draw", "example")
    assert data.observed_data["y"].dims == ("example",)
    np.testing.assert_array_equal(data.posterior["w"].values, g["posterior"]["w"])


def test_loo_of_a_likelihood_that_draws_barely_change_is_the_likelihood():
    """If every draw gives example n (nearly) the same log-likelihood c_n, leaving n out
    changes nothing: elpd_loo = sum c_n and the effective number of parameters is 0."""
    g = groups()
    data = arviz_compat.from_groups(g, {"y": ["example"]}, {})
    result = arviz_compat.loo(data)
    assert result.elpd == pytest.approx(g["log_likelihood"]["y"][0].mean(0).sum(), abs=1e-6)
    assert result.p == pytest.approx(0.0, abs=1e-6)
    assert result.pareto_k.shape == (30,)


def test_pareto_khat_reads_good_and_poor_proposals():
    """Target N(0, 1). A wider Normal proposal has bounded ratios (k-hat well below 0.5);
    a proposal of std 0.4 gives ratios exp(2.6 x^2)-heavy tails (k-hat above 0.7)."""
    rng = np.random.default_rng(1)
    for std, good in ((2.0, True), (0.4, False)):
        x = std * rng.standard_normal(4000)
        log_ratios = -0.5 * x**2 - (-0.5 * (x / std) ** 2 - np.log(std))
        khat = arviz_compat.pareto_khat(log_ratios)
        assert (khat < 0.5) if good else (khat > 0.7), (std, khat)
