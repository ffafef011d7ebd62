"""Tests for the 2D mixture fit (Sec. 4.2, Eq. 3): known answers, scipy, sklearn."""

from __future__ import annotations

import contextlib
import itertools
import math

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

from pyro_gbnn.sharing.gmm import GMMResult, fit_gmm_2d, gmm_assign, gmm_log_likelihood

WEIGHTS = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
MEANS = torch.tensor([[0.0, 0.0], [3.0, 1.0], [-2.0, 4.0]], dtype=torch.float64)
COVS = torch.tensor(
    [[[1.0, 0.3], [0.3, 0.5]], [[0.4, -0.1], [-0.1, 0.8]], [[0.6, 0.0], [0.0, 0.3]]], dtype=torch.float64
)


@contextlib.contextmanager
def single_thread():
    """These problems are small: on a busy 2-core machine, OpenMP hand-offs between two
    threads cost more than the work (measured up to 20x slower), so use one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def one_thread():
    # Runs after the conftest's autouse fixture that sets 2 threads.
    with single_thread():
        yield


def sample_mixture(n: int, weights=WEIGHTS, means=MEANS, covs=COVS, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.multinomial(weights, n, replacement=True, generator=g)
    chol = torch.linalg.cholesky(covs)
    eps = torch.randn(n, 2, 1, generator=g, dtype=torch.float64)
    return means[z] + (chol[z] @ eps).squeeze(-1)


def bnn_like(n: int, seed: int = 0) -> torch.Tensor:
    """(mu, sigma) points at BNN scales: mu ~ 0.05 t(4), sigma ~ 1e-2 lognormal."""
    rng = np.random.default_rng(seed)
    mu = 0.05 * rng.standard_t(4, n)
    sigma = 1e-2 * np.exp(0.5 * rng.standard_normal(n) + 2.0 * np.abs(mu))
    return torch.from_numpy(np.stack([mu, sigma], 1))


def scipy_log_densities(x: torch.Tensor, weights, means, covs) -> np.ndarray:
    """[N, K] log w_k N(x | m_k, S_k) by scipy."""
    x = x.double().numpy()
    return np.stack(
        [
            math.log(float(w)) + multivariate_normal(m.numpy(), c.numpy()).logpdf(x)
            for w, m, c in zip(weights, means, covs)
        ],
        axis=1,
    )


def match(result: GMMResult, means: torch.Tensor) -> list[int]:
    """Permutation p with result component p[j] closest to true component j."""
    best = min(
        itertools.permutations(range(len(means))),
        key=lambda p: float(((result.means[list(p)] - means) ** 2).sum()),
    )
    return list(best)


@pytest.fixture(scope="module")
def mixture_points() -> torch.Tensor:
    return sample_mixture(30_000)


@pytest.fixture(scope="module")
def mixture_fit(mixture_points) -> GMMResult:
    with single_thread():
        return fit_gmm_2d(mixture_points, 3, tol=1e-7, max_epochs=200)


def test_recovers_known_mixture(mixture_fit):
    r = mixture_fit
    assert r.converged
    p = match(r, MEANS)
    se = (COVS.diagonal(dim1=1, dim2=2) / (WEIGHTS[:, None] * 30_000)).sqrt()  # std error of each mean
    assert torch.all((r.means[p] - MEANS).abs() < 5 * se + 1e-3)
    assert torch.allclose(r.weights[p], WEIGHTS, atol=0.03)
    scale = COVS.diagonal(dim1=1, dim2=2)
    rel = (r.covs[p] - COVS).abs() / (scale[:, :, None] * scale[:, None, :]).sqrt()
    assert float(rel.max()) < 0.1
    assert r.weights.sum().item() == pytest.approx(1.0)
    assert r.means.shape == (3, 2) and r.covs.shape == (3, 2, 2) and r.weights.dtype == torch.float64


def test_epoch_mode_history_never_decreases(mixture_points):
    # Exact EM in float64: monotone up to rounding. K = 8 > true 3, so components fight.
    r = fit_gmm_2d(mixture_points[:5000], 8, tol=0.0, max_epochs=40, compute_dtype=torch.float64)
    h = np.array(r.history)
    assert len(h) == r.n_iter + 1 == 41
    assert np.all(np.diff(h) >= -1e-9 * np.abs(h[1:]))
    assert h[-1] > h[0] + 1e-3
    assert r.mean_log_likelihood == h[-1]


def test_epoch_mode_history_float32_nearly_monotone():
    r = fit_gmm_2d(bnn_like(20_000), 32, tol=0.0, max_epochs=15)
    h = np.array(r.history)
    assert np.all(np.diff(h) >= -1e-6 * np.abs(h[1:]))


def test_seeded_runs_are_identical(mixture_points):
    x = mixture_points[:4000]
    for mode in ("epoch", "stepwise"):
        a = fit_gmm_2d(x, 4, seed=3, max_epochs=3, mode=mode, batch_size=1000)
        b = fit_gmm_2d(x, 4, seed=3, max_epochs=3, mode=mode, batch_size=1000)
        assert torch.equal(a.means, b.means) and torch.equal(a.covs, b.covs) and torch.equal(a.weights, b.weights)
        assert a.history == b.history and a.mean_log_likelihood == b.mean_log_likelihood
    c = fit_gmm_2d(x, 4, seed=4, max_epochs=3)
    assert not torch.equal(a.means, c.means)


def test_callback_and_logging(mixture_points, caplog):
    seen = []
    with caplog.at_level("INFO", logger="pyro_gbnn.sharing.gmm"):
        r = fit_gmm_2d(mixture_points[:3000], 3, max_epochs=4, tol=0.0, callback=lambda e, ll: seen.append((e, ll)),
                       log_every=2)
    assert seen == list(enumerate(r.history))
    assert sum("mean log-likelihood" in m for m in caplog.messages) == 3  # epochs 0, 2, 4


def test_float32_input(mixture_points, mixture_fit):
    r = fit_gmm_2d(mixture_points.float(), 3, tol=1e-6, max_epochs=200)
    assert r.weights.dtype == torch.float64
    assert r.mean_log_likelihood == pytest.approx(mixture_fit.mean_log_likelihood, abs=1e-4)
    r32 = fit_gmm_2d(mixture_points.float(), 3, max_epochs=3, dtype=torch.float32)
    assert r32.means.dtype == torch.float32 and torch.isfinite(r32.covs).all()


def test_stepwise_mode_reaches_epoch_optimum(mixture_points, mixture_fit):
    r = fit_gmm_2d(mixture_points, 3, mode="stepwise", batch_size=4096, max_epochs=6, tol=1e-5)
    assert r.mean_log_likelihood > mixture_fit.mean_log_likelihood - 2e-3
    assert r.n_iter == len(r.history)


def test_log_likelihood_matches_scipy():
    x = sample_mixture(500, seed=1)
    expected = float(np.mean(np.logaddexp.reduce(scipy_log_densities(x, WEIGHTS, MEANS, COVS), axis=1)))
    exact = gmm_log_likelihood(x, WEIGHTS, MEANS, COVS, compute_dtype=torch.float64)
    assert exact == pytest.approx(expected, rel=1e-10)
    assert gmm_log_likelihood(x, WEIGHTS, MEANS, COVS, batch_size=7) == pytest.approx(expected, rel=1e-5)


def test_fit_reports_log_likelihood_of_its_parameters():
    x = bnn_like(3000, seed=2)
    r = fit_gmm_2d(x, 6, max_epochs=20, compute_dtype=torch.float64)
    dens = scipy_log_densities(x, r.weights, r.means, r.covs)
    assert r.mean_log_likelihood == pytest.approx(float(np.mean(np.logaddexp.reduce(dens, axis=1))), rel=1e-9)


def test_assign_agrees_with_scipy_argmax():
    x = sample_mixture(800, seed=2)
    log_dens = scipy_log_densities(x, WEIGHTS, MEANS, COVS)
    assignments, log_resp_max = gmm_assign(x, WEIGHTS, MEANS, COVS, batch_size=100)
    assert assignments.dtype == torch.long and assignments.shape == (800,)
    np.testing.assert_array_equal(assignments.numpy(), log_dens.argmax(1))
    log_resp = log_dens - np.logaddexp.reduce(log_dens, axis=1, keepdims=True)
    np.testing.assert_allclose(log_resp_max.numpy(), log_resp.max(1), atol=1e-4)


def test_pruning_is_exact_with_many_components():
    # 400 components on a spread-out cloud: most (point, component) pairs are pruned.
    g = torch.Generator().manual_seed(5)
    k = 400
    means = torch.rand(k, 2, generator=g, dtype=torch.float64) * 20
    covs = torch.diag_embed(0.05 + 0.2 * torch.rand(k, 2, generator=g, dtype=torch.float64))
    weights = torch.full((k,), 1.0 / k, dtype=torch.float64)
    x = sample_mixture(4000, weights, means, covs, seed=6)
    log_dens = scipy_log_densities(x, weights, means, covs)
    expected = float(np.mean(np.logaddexp.reduce(log_dens, axis=1)))
    exact = gmm_log_likelihood(x, weights, means, covs, compute_dtype=torch.float64)
    assert exact == pytest.approx(expected, rel=1e-12)
    assignments, _ = gmm_assign(x, weights, means, covs)
    np.testing.assert_array_equal(assignments.numpy(), log_dens.argmax(1))


def test_narrow_components_in_sparse_regions_are_accurate_in_float32():
    # Tight clusters far out in the tails sit in large grid cells, where the float32
    # expansion of their quadratic would cancel catastrophically; those blocks must fall
    # back to float64 so the result still matches scipy.
    means = torch.tensor([[0.0, 0.0], [30.0, -20.0], [-25.0, 40.0], [31.0, -20.0]], dtype=torch.float64)
    covs = torch.stack(
        [torch.eye(2), 1e-8 * torch.eye(2), torch.tensor([[1e-6, 0.0], [0.0, 1e-10]]), 0.5 * torch.eye(2)]
    ).double()
    weights = torch.tensor([0.97, 0.01, 0.01, 0.01], dtype=torch.float64)
    x = sample_mixture(5000, weights, means, covs, seed=7)
    dens = scipy_log_densities(x, weights, means, covs)
    expected = float(np.mean(np.logaddexp.reduce(dens, axis=1)))
    assert gmm_log_likelihood(x, weights, means, covs) == pytest.approx(expected, rel=1e-6)
    assignments, _ = gmm_assign(x, weights, means, covs)
    np.testing.assert_array_equal(assignments.numpy(), dens.argmax(1))


def test_not_worse_than_sklearn():
    from sklearn.mixture import GaussianMixture
    from threadpoolctl import threadpool_limits

    x = bnn_like(3000, seed=3)
    k = 6
    reg = 1e-6 * float(x.var(0).min())
    with threadpool_limits(1):  # as one_thread, for numpy's BLAS
        sk = GaussianMixture(k, covariance_type="full", reg_covar=reg, random_state=0, tol=1e-4, max_iter=300)
        sk.fit(x.numpy())
    ours = fit_gmm_2d(x, k, tol=1e-4, max_epochs=300)
    sk_ll = float(sk.score(x.numpy()))
    assert ours.mean_log_likelihood >= sk_ll - 1e-3 * abs(sk_ll)


def test_sigma_scale_points_and_dead_components():
    # K close to N: some components lose all their points and are dropped (weight 0).
    x = bnn_like(300, seed=4)
    r = fit_gmm_2d(x, 150, max_epochs=30)
    assert torch.isfinite(r.covs).all() and torch.isfinite(r.means).all()
    assert (r.weights >= 0).all() and r.weights.sum().item() == pytest.approx(1.0)
    det = r.covs[:, 0, 0] * r.covs[:, 1, 1] - r.covs[:, 0, 1] ** 2
    assert (det > 0).all()
    assert math.isfinite(r.mean_log_likelihood)


def test_constant_coordinate():
    x = torch.stack([torch.linspace(-1, 1, 500, dtype=torch.float64), torch.full((500,), 1e-3, dtype=torch.float64)], 1)
    r = fit_gmm_2d(x, 2, max_epochs=10)
    assert torch.isfinite(r.covs).all() and math.isfinite(r.mean_log_likelihood)


@pytest.mark.parametrize(
    "points, k, match_text",
    [
        (torch.zeros(10, 3), 2, r"shape \[N, 2\]"),
        (torch.zeros(10), 2, r"shape \[N, 2\]"),
        (torch.zeros(0, 2), 1, "empty"),
        (torch.zeros(10, 2, dtype=torch.long), 2, "floating-point"),
        (torch.tensor([[0.0, 1.0], [float("nan"), 0.0], [1.0, 1.0]]), 2, "finite"),
        (torch.tensor([[0.0, 1.0], [float("inf"), 0.0], [1.0, 1.0]]), 2, "finite"),
        (torch.randn(5, 2), 6, "num_components must be <= the number of points N=5, got 6"),
        (torch.randn(5, 2), 0, "num_components must be an integer >= 1, got 0"),
        (torch.randn(5, 2), 2.5, "num_components"),
        ([[0.0, 1.0]], 1, "torch.Tensor"),
    ],
)
def test_bad_input_raises(points, k, match_text):
    with pytest.raises(ValueError, match=match_text):
        fit_gmm_2d(points, k)


@pytest.mark.parametrize(
    "kwargs, match_text",
    [
        ({"mode": "online"}, "mode must be one of"),
        ({"init": "kmeans"}, "init must be one of"),
        ({"batch_size": 0}, "batch_size"),
        ({"reg_covar": -1.0}, "reg_covar"),
        ({"reg_covar": 0.0}, "reg_covar must be a finite number > 0"),
        ({"tol": -1.0}, "tol"),
        ({"dtype": torch.float16}, "dtype"),
    ],
)
def test_bad_options_raise(kwargs, match_text):
    with pytest.raises(ValueError, match=match_text):
        fit_gmm_2d(torch.randn(20, 2), 2, **kwargs)


def test_bad_mixture_raises():
    x = torch.randn(10, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="sum to 1"):
        gmm_log_likelihood(x, WEIGHTS * 2, MEANS, COVS)
    with pytest.raises(ValueError, match="positive definite"):
        gmm_assign(x, WEIGHTS, MEANS, -COVS)
    with pytest.raises(ValueError, match=r"means must have shape \[K, 2\]"):
        gmm_log_likelihood(x, WEIGHTS, MEANS[:2], COVS)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(mixture_points, mixture_fit):
    r = fit_gmm_2d(mixture_points.cuda(), 3, tol=1e-7, max_epochs=200)
    assert r.means.device.type == "cuda"
    assert r.mean_log_likelihood == pytest.approx(mixture_fit.mean_log_likelihood, abs=1e-5)
    a, _ = gmm_assign(mixture_points.cuda(), r.weights, r.means, r.covs)
    b, _ = gmm_assign(mixture_points, r.weights.cpu(), r.means.cpu(), r.covs.cpu())
    assert (a.cpu() == b).float().mean() > 0.999
