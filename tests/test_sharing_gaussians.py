"""2D Gaussian algebra against scipy's matrix square root and known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from pyro_gbnn.sharing.gaussians import (
    MERGE_RULES,
    log_density,
    mahalanobis2,
    merge_gaussians,
    pairwise_wasserstein2,
    sqrtm_2x2,
    wasserstein2,
)

F64 = torch.float64


def random_spd(n: int, generator: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    a = torch.randn(n, 2, 2, dtype=F64, generator=generator)
    return scale * (a @ a.mT + 0.05 * torch.eye(2, dtype=F64))


def random_pairs(n: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    m1 = torch.randn(n, 2, dtype=F64, generator=g)
    m2 = torch.randn(n, 2, dtype=F64, generator=g)
    return m1, random_spd(n, g), m2, random_spd(n, g)


def scipy_sqrtm(a: np.ndarray) -> np.ndarray:
    return np.real(scipy.linalg.sqrtm(a))


def scipy_w2(m1, s1, m2, s2) -> float:
    r = scipy_sqrtm(s1)
    return float(np.sum((m1 - m2) ** 2) + np.trace(s1 + s2 - 2 * scipy_sqrtm(r @ s2 @ r)))


def test_sqrtm_2x2_squares_back_and_matches_scipy():
    g = torch.Generator().manual_seed(1)
    covs = torch.cat([random_spd(50, g), random_spd(5, g, scale=1e-6)])
    root = sqrtm_2x2(covs)
    torch.testing.assert_close(root @ root, covs, rtol=1e-10, atol=1e-20)
    torch.testing.assert_close(root, root.mT)
    for c, r in zip(covs.numpy(), root.numpy()):
        np.testing.assert_allclose(r, scipy_sqrtm(c), rtol=1e-8, atol=1e-14)


def test_sqrtm_2x2_of_zero_and_singular():
    assert torch.equal(sqrtm_2x2(torch.zeros(2, 2, dtype=F64)), torch.zeros(2, 2, dtype=F64))
    v = torch.tensor([[3.0], [4.0]], dtype=F64)
    rank_one = v @ v.T
    root = sqrtm_2x2(rank_one)
    torch.testing.assert_close(root @ root, rank_one)


def test_wasserstein2_matches_scipy_route():
    m1, s1, m2, s2 = random_pairs()
    ours = wasserstein2(m1, s1, m2, s2)
    ref = [scipy_w2(*(x[i].numpy() for x in (m1, s1, m2, s2))) for i in range(m1.shape[0])]
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-6)
    assert ours.dtype == F64


def test_wasserstein2_symmetric_and_zero_on_identical():
    m1, s1, m2, s2 = random_pairs()
    torch.testing.assert_close(wasserstein2(m1, s1, m2, s2), wasserstein2(m2, s2, m1, s1), rtol=1e-12, atol=1e-12)
    same = wasserstein2(m1, s1, m1, s1)
    assert torch.all(same >= 0) and float(same.max()) < 1e-12


def test_wasserstein2_broadcasts_and_pairwise_agrees():
    m1, s1, _, _ = random_pairs(n=7)
    table = wasserstein2(m1[:, None], s1[:, None], m1[None], s1[None])
    assert table.shape == (7, 7)
    pair = pairwise_wasserstein2(m1, s1)
    torch.testing.assert_close(pair, table, rtol=1e-10, atol=1e-12)
    assert torch.equal(pair, pair.T) and torch.all(pair.diagonal() == 0)


def test_wasserstein2_of_diracs_is_squared_euclidean():
    m1, _, m2, _ = random_pairs(n=5)
    zero = torch.zeros(5, 2, 2, dtype=F64)
    torch.testing.assert_close(wasserstein2(m1, zero, m2, zero), ((m1 - m2) ** 2).sum(-1))


def test_barycenter_returns_identical_input():
    m1, s1, _, _ = random_pairs()
    mean, cov = merge_gaussians(m1, s1, m1, s1)
    torch.testing.assert_close(mean, m1)
    torch.testing.assert_close(cov, s1, rtol=1e-10, atol=1e-12)


def test_barycenter_is_w2_midpoint():
    m1, s1, m2, s2 = random_pairs()
    mean, cov = merge_gaussians(m1, s1, m2, s2, rule="barycenter")
    d = wasserstein2(m1, s1, m2, s2).sqrt()
    torch.testing.assert_close(wasserstein2(mean, cov, m1, s1).sqrt(), d / 2, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(wasserstein2(mean, cov, m2, s2).sqrt(), d / 2, rtol=1e-8, atol=1e-10)


def test_barycenter_matches_transport_map_formula():
    m1, s1, m2, s2 = random_pairs(n=16, seed=3)
    t = torch.rand(16, dtype=F64, generator=torch.Generator().manual_seed(0))
    w1, w2 = 1 - t, t
    _, cov = merge_gaussians(m1, s1, m2, s2, weight1=w1 * 7, weight2=w2 * 7)
    for i in range(16):
        a, b = s1[i].numpy(), s2[i].numpy()
        r = scipy_sqrtm(a)
        ri = np.linalg.inv(r)
        transport = ri @ scipy_sqrtm(r @ b @ r) @ ri
        step = (1 - t[i].item()) * np.eye(2) + t[i].item() * transport
        np.testing.assert_allclose(cov[i].numpy(), step @ a @ step, rtol=1e-8, atol=1e-12)


def test_weighted_barycenter_lies_on_geodesic():
    m1, s1, m2, s2 = random_pairs(seed=4)
    mean, cov = merge_gaussians(m1, s1, m2, s2, weight1=3.0, weight2=1.0)
    torch.testing.assert_close(mean, 0.75 * m1 + 0.25 * m2)
    d = wasserstein2(m1, s1, m2, s2).sqrt()
    torch.testing.assert_close(wasserstein2(mean, cov, m1, s1).sqrt(), 0.25 * d, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(wasserstein2(mean, cov, m2, s2).sqrt(), 0.75 * d, rtol=1e-8, atol=1e-10)


def test_paper_rule_is_eqs_5_6_literally():
    m1, s1, m2, s2 = random_pairs(n=16, seed=5)
    mean, cov = merge_gaussians(m1, s1, m2, s2, rule="paper")
    torch.testing.assert_close(mean, (m1 + m2) / 2)
    for i in range(16):
        a, b = s1[i].numpy(), s2[i].numpy()
        d = (m1[i] - m2[i]).numpy()[:, None]
        r = scipy_sqrtm(a)
        expected = (a + b) / 2 + d @ d.T / 8 + scipy_sqrtm(r @ b @ r) / 2
        np.testing.assert_allclose(cov[i].numpy(), expected, rtol=1e-8, atol=1e-12)


def test_paper_rule_gives_one_and_a_half_s_on_identical_inputs():
    m1, s1, _, _ = random_pairs()
    _, cov = merge_gaussians(m1, s1, m1, s1, rule="paper")
    torch.testing.assert_close(cov, 1.5 * s1, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("weights", [(None, None), (0.3, 0.7)])
def test_moments_rule_matches_mixture_samples(weights):
    g = torch.Generator().manual_seed(6)
    m1 = torch.tensor([0.0, 1.0], dtype=F64)
    m2 = torch.tensor([2.0, -1.0], dtype=F64)
    s1 = torch.tensor([[1.0, 0.3], [0.3, 0.5]], dtype=F64)
    s2 = torch.tensor([[0.4, -0.2], [-0.2, 0.8]], dtype=F64)
    w1, w2 = weights
    p = 0.5 if w1 is None else w1 / (w1 + w2)
    mean, cov = merge_gaussians(m1, s1, m2, s2, rule="moments", weight1=w1, weight2=w2)
    n = 400_000
    first = torch.rand(n, generator=g, dtype=F64) < p
    z = torch.randn(n, 2, generator=g, dtype=F64)
    x = torch.where(
        first[:, None],
        m1 + z @ torch.linalg.cholesky(s1).T,
        m2 + z @ torch.linalg.cholesky(s2).T,
    )
    # Tolerance: 5 standard errors of the mean / covariance entries (variances are O(2)).
    tol = 5 * math.sqrt(3.0 / n) * 3
    torch.testing.assert_close(x.mean(0), mean, rtol=0, atol=tol)
    torch.testing.assert_close(torch.cov(x.T), cov, rtol=0, atol=2 * tol)


def test_merge_preserves_float32():
    m1, s1, m2, s2 = (x.float() for x in random_pairs(n=4))
    for rule in MERGE_RULES:
        mean, cov = merge_gaussians(m1, s1, m2, s2, rule=rule)
        assert mean.dtype == cov.dtype == torch.float32


def test_mahalanobis_and_log_density_against_torch():
    g = torch.Generator().manual_seed(7)
    means = torch.randn(6, 2, dtype=F64, generator=g)
    covs = random_spd(6, g, scale=1e-3)
    points = torch.randn(40, 2, dtype=F64, generator=g) * 0.1
    d2 = mahalanobis2(points, means, covs)
    diff = points[:, None, :] - means[None]
    ref = (diff[..., None, :] @ torch.linalg.inv(covs)[None] @ diff[..., :, None])[..., 0, 0]
    torch.testing.assert_close(d2, ref, rtol=1e-10, atol=1e-10)
    dist = torch.distributions.MultivariateNormal(means, covariance_matrix=covs)
    expected = dist.log_prob(points[:, None, :])
    torch.testing.assert_close(log_density(points, means, covs), expected, rtol=1e-10, atol=1e-8)


def test_unknown_rule_lists_accepted_rules():
    m1, s1, m2, s2 = random_pairs(n=2)
    with pytest.raises(ValueError, match="barycenter, moments, paper"):
        merge_gaussians(m1, s1, m2, s2, rule="average")


def test_paper_rule_rejects_weights():
    m1, s1, m2, s2 = random_pairs(n=2)
    with pytest.raises(ValueError, match="equal weights"):
        merge_gaussians(m1, s1, m2, s2, rule="paper", weight1=1.0, weight2=2.0)
    with pytest.raises(ValueError, match="both weight1 and weight2"):
        merge_gaussians(m1, s1, m2, s2, weight1=1.0)


def test_bad_covariances_raise():
    m1, s1, m2, s2 = random_pairs(n=2)
    with pytest.raises(ValueError, match=r"\[\.\.\., 2, 2\]"):
        wasserstein2(m1, torch.eye(3, dtype=F64).expand(2, 3, 3), m2, s2)
    asym = s1.clone()
    asym[0, 0, 1] += 1.0
    with pytest.raises(ValueError, match="not symmetric"):
        wasserstein2(m1, asym, m2, s2)
    indefinite = torch.tensor([[[1.0, 2.0], [2.0, 1.0]]], dtype=F64)
    with pytest.raises(ValueError, match="positive semi-definite"):
        sqrtm_2x2(indefinite)
    singular = torch.zeros(1, 2, 2, dtype=F64)
    with pytest.raises(ValueError, match="positive definite"):
        mahalanobis2(torch.zeros(3, 2, dtype=F64), torch.zeros(1, 2, dtype=F64), singular)
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        mahalanobis2(torch.zeros(3, 3, dtype=F64), m1, s1)
    with pytest.raises(ValueError, match="NaN"):
        wasserstein2(m1 * float("nan"), s1, m2, s2)
    with pytest.raises(ValueError, match="floating-point"):
        pairwise_wasserstein2(torch.zeros(2, 2, dtype=torch.long), s1)
