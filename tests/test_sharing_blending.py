"""Ellipse test and alpha-blending coefficients (Sec. 4.3, Eq. 7)."""

from __future__ import annotations

import math

import pytest
import scipy.stats
import torch

from pyro_gbnn.sharing.blending import CHI2_2DOF_95, blend_weights, ellipse_mask
from pyro_gbnn.sharing.gaussians import log_density, mahalanobis2

F64 = torch.float64


def components(k: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    means = torch.rand(k, 2, dtype=F64, generator=g) * torch.tensor([0.4, 0.02], dtype=F64)
    a = torch.randn(k, 2, 2, dtype=F64, generator=g) * torch.tensor([[0.02], [0.002]], dtype=F64)
    covs = a @ a.mT + 1e-7 * torch.eye(2, dtype=F64)
    return means, covs, g


def test_threshold_is_chi_square_2dof_95_quantile():
    assert CHI2_2DOF_95 == pytest.approx(scipy.stats.chi2.ppf(0.95, 2), rel=1e-14)
    assert round(CHI2_2DOF_95, 3) == 5.991


def test_ellipse_mask_selects_points_outside_the_95_ellipse():
    means, covs, g = components(k=3)
    n = 600
    assignments = torch.randint(0, 3, (n,), generator=g)
    radius = torch.where(torch.arange(n) % 2 == 0, 0.98, 1.02) * math.sqrt(CHI2_2DOF_95)
    angle = torch.rand(n, dtype=F64, generator=g) * 2 * math.pi
    unit = torch.stack([angle.cos(), angle.sin()], 1) * radius[:, None]
    chol = torch.linalg.cholesky(covs)[assignments]
    points = means[assignments] + (chol @ unit[:, :, None])[:, :, 0]
    mask = ellipse_mask(points, means, covs, assignments)
    assert torch.equal(mask, radius > math.sqrt(CHI2_2DOF_95))
    # Only the own component counts: the same points assigned elsewhere give another answer.
    other = (assignments + 1) % 3
    own = mahalanobis2(points, means, covs).gather(1, other[:, None])[:, 0]
    assert torch.equal(ellipse_mask(points, means, covs, other), own > CHI2_2DOF_95)


def test_blend_weights_pick_k_nearest_with_density_ratios():
    means, covs, g = components()
    points = torch.rand(500, 2, dtype=F64, generator=g) * torch.tensor([0.4, 0.02], dtype=F64)
    indices, alphas = blend_weights(points, means, covs, k=5)
    assert indices.shape == alphas.shape == (500, 5) and indices.dtype == torch.long
    torch.testing.assert_close(alphas.sum(1), torch.ones(500, dtype=F64))
    d2 = mahalanobis2(points, means, covs)
    assert torch.equal(indices, d2.argsort(1)[:, :5])
    logp = log_density(points, means, covs).gather(1, indices)
    torch.testing.assert_close(
        (alphas[:, 1:] / alphas[:, :1]).log(), logp[:, 1:] - logp[:, :1], rtol=1e-9, atol=1e-9
    )


def test_blend_weights_chunks_and_caps_k():
    means, covs, g = components(k=4)
    points = torch.rand(300, 2, dtype=F64, generator=g) * 0.3
    whole = blend_weights(points, means, covs, k=10)
    assert whole[0].shape == (300, 4)
    chunked = blend_weights(points, means, covs, k=10, chunk_size=7)
    assert torch.equal(whole[0], chunked[0])
    torch.testing.assert_close(whole[1], chunked[1], rtol=0, atol=0)


def test_blend_weights_far_points_stay_finite():
    means, covs, _ = components(k=5)
    far = torch.tensor([[100.0, 100.0]], dtype=F64)
    _, alphas = blend_weights(far, means, covs, k=3)
    assert torch.isfinite(alphas).all()
    torch.testing.assert_close(alphas.sum(1), torch.ones(1, dtype=F64))


def test_blend_weights_float32():
    means, covs, g = components(k=6)
    points = torch.rand(50, 2, dtype=F64, generator=g) * 0.3
    idx, alphas = blend_weights(points.float(), means.float(), covs.float(), k=2)
    assert alphas.dtype == torch.float32
    torch.testing.assert_close(alphas.sum(1), torch.ones(50))


def test_bad_arguments_raise():
    means, covs, _ = components(k=3)
    points = torch.zeros(4, 2, dtype=F64)
    with pytest.raises(ValueError, match="k must be"):
        blend_weights(points, means, covs, k=0)
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        ellipse_mask(points, means, covs, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="N=4"):
        ellipse_mask(points, means, covs, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="dtype"):
        blend_weights(points.float(), means, covs)


def test_blend_ranking_survives_tiny_covariances_far_from_origin():
    g = torch.Generator().manual_seed(3)
    means = torch.tensor([0.15, 0.03], dtype=F64) + torch.rand(30, 2, dtype=F64, generator=g) * 1e-3
    covs = 1e-10 * torch.eye(2, dtype=F64) * (1 + torch.rand(30, 1, 1, dtype=F64, generator=g))
    points = means[torch.randint(0, 30, (200,), generator=g)] + 1e-5 * torch.randn(200, 2, dtype=F64, generator=g)
    indices, alphas = blend_weights(points, means, covs, k=3)
    d2 = mahalanobis2(points, means, covs)
    assert torch.equal(indices, d2.argsort(1)[:, :3])
    logp = log_density(points, means, covs).gather(1, indices)
    torch.testing.assert_close(alphas, torch.softmax(logp, 1), rtol=1e-9, atol=1e-12)
