"""Outlier selection (Sec. 4.1) and dissolving small clusters (App. I.5)."""

from __future__ import annotations

import pytest
import torch

from pyro_gbnn.sharing.outliers import dissolve_small_clusters, outlier_mask, top_fraction_count


def test_mean_threshold_is_strict():
    mu = torch.tensor([-0.3, -0.2, 0.0, 0.19, 0.2, 0.21])
    assert outlier_mask(mu).tolist() == [True, False, False, False, False, True]


def test_exactly_the_top_one_percent_of_gradients():
    g = torch.Generator().manual_seed(0)
    n = 1000
    mu = torch.zeros(n)
    grads = torch.rand(n, generator=g)
    mask = outlier_mask(mu, grads)
    assert int(mask.sum()) == 10
    assert torch.equal(mask.nonzero().squeeze(1).sort().values, grads.topk(10).indices.sort().values)


def test_count_is_ceil_and_ties_break_by_index():
    assert top_fraction_count(0.01, 300) == 3  # 0.01 * 300 is 3.0000000000000004 in floats
    assert top_fraction_count(0.01, 301) == 4
    assert top_fraction_count(0.01, 5) == 1
    mask = outlier_mask(torch.zeros(250), torch.ones(250), tau_w=None)
    assert mask.nonzero().squeeze(1).tolist() == [0, 1, 2]


def test_heavy_ties_match_a_stable_sort():
    g = torch.Generator().manual_seed(1)
    grads = torch.randint(0, 5, (2000,), generator=g).double()
    mask = outlier_mask(torch.zeros(2000, dtype=torch.float64), grads, top_grad_fraction=0.03)
    expected = torch.zeros(2000, dtype=torch.bool)
    expected[torch.sort(grads, descending=True, stable=True).indices[:60]] = True
    assert torch.equal(mask, expected)


def test_signed_gradients_use_magnitude_and_shape_is_kept():
    mu = torch.zeros(10, 20, dtype=torch.float64)
    grads = torch.zeros(10, 20, dtype=torch.float64)
    grads[3, 4] = -5.0
    grads[7, 1] = 4.0
    mask = outlier_mask(mu, grads, top_grad_fraction=0.01)
    assert mask.shape == (10, 20)
    assert mask.nonzero().tolist() == [[3, 4], [7, 1]]


def test_each_criterion_switches_off():
    mu = torch.tensor([0.5, 0.0, 0.0, 0.0])
    grads = torch.tensor([0.0, 0.0, 9.0, 0.0])
    assert outlier_mask(mu, grads, top_grad_fraction=0.25).tolist() == [True, False, True, False]
    assert outlier_mask(mu, grads, tau_w=None, top_grad_fraction=0.25).tolist() == [False, False, True, False]
    assert outlier_mask(mu, grads, top_grad_fraction=None).tolist() == [True, False, False, False]
    assert outlier_mask(mu, grads, top_grad_fraction=0).tolist() == [True, False, False, False]
    assert outlier_mask(mu, None, top_grad_fraction=0.25).tolist() == [True, False, False, False]
    assert not outlier_mask(mu, grads, tau_w=None, top_grad_fraction=None).any()


def test_dissolve_small_clusters_remaps_contiguously():
    sizes = [5, 40, 0, 31, 29, 30]
    assignments = torch.cat([torch.full((s,), k) for k, s in enumerate(sizes)] + [torch.tensor([-1, -1])])
    assignments = assignments[torch.randperm(assignments.numel(), generator=torch.Generator().manual_seed(0))]
    keep, kept, remap = dissolve_small_clusters(assignments, num_components=6, min_size=30)
    assert kept.tolist() == [1, 3, 5]
    assert remap.tolist() == [-1, 0, -1, 1, -1, 2]
    assert torch.equal(keep, (assignments == 1) | (assignments == 3) | (assignments == 5))
    new = remap[assignments[keep]]
    assert new.min() == 0 and new.max() == 2
    assert torch.bincount(new).tolist() == [40, 31, 30]


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="tau_w"):
        outlier_mask(torch.zeros(3), tau_w=-0.1)
    with pytest.raises(ValueError, match=r"top_grad_fraction .* \[0, 1\]"):
        outlier_mask(torch.zeros(3), torch.zeros(3), top_grad_fraction=1.5)
    with pytest.raises(ValueError, match="shaped like mu"):
        outlier_mask(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="floating-point"):
        outlier_mask(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        dissolve_small_clusters(torch.tensor([0, 3]), num_components=3)
    with pytest.raises(ValueError, match="integer tensor"):
        dissolve_small_clusters(torch.tensor([0.0, 1.0]), num_components=3)
