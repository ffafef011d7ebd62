"""Merging close components: thresholds, greedy matching, composed mappings."""

from __future__ import annotations

import math

import pytest
import torch

from pyro_gbnn.sharing.gaussians import merge_gaussians, pairwise_wasserstein2
from pyro_gbnn.sharing.merging import MergeResult, _greedy_matching, merge_components, pooled_variance

F64 = torch.float64


def isotropic(k: int, var: float = 1e-4) -> torch.Tensor:
    return var * torch.eye(2, dtype=F64).expand(k, 2, 2).clone()


def on_line(xs: list[float]) -> torch.Tensor:
    return torch.tensor([[x, 0.05] for x in xs], dtype=F64)


def naive_greedy(dist: torch.Tensor) -> torch.Tensor:
    """Reference: sort allowed pairs by (cost, i, j) and take those with both ends free."""
    k = dist.shape[0]
    pairs = sorted(
        (float(dist[i, j]), i, j) for i in range(k) for j in range(i + 1, k) if math.isfinite(float(dist[i, j]))
    )
    partner = [-1] * k
    for _, i, j in pairs:
        if partner[i] < 0 and partner[j] < 0:
            partner[i], partner[j] = j, i
    return torch.tensor(partner)


def naive_merge(means, covs, weights, tau_w2sq):
    """Reference loop implementation of merge rounds (barycenter, weighted)."""
    groups = [[i] for i in range(means.shape[0])]
    means, covs, weights = list(means), list(covs), list(weights)
    while True:
        k = len(means)
        dist = pairwise_wasserstein2(torch.stack(means), torch.stack(covs)) if k > 1 else None
        if dist is None:
            break
        dist = dist.masked_fill(~(dist < tau_w2sq) | torch.eye(k, dtype=torch.bool), math.inf)
        partner = naive_greedy(dist).tolist()
        if all(p < 0 for p in partner):
            break
        new = []
        for i in range(k):
            p = partner[i]
            if p < 0:
                new.append((means[i], covs[i], weights[i], groups[i]))
            elif p > i:
                m, c = merge_gaussians(
                    means[i], covs[i], means[p], covs[p], rule="barycenter", weight1=weights[i], weight2=weights[p]
                )
                new.append((m, c, weights[i] + weights[p], groups[i] + groups[p]))
        means, covs, weights, groups = (list(x) for x in zip(*new))
    return torch.stack(means), torch.stack(covs), torch.stack(weights), groups


def test_greedy_matching_equals_sorted_greedy():
    g = torch.Generator().manual_seed(0)
    for trial in range(30):
        k = int(torch.randint(2, 40, (1,), generator=g))
        d = torch.rand(k, k, generator=g, dtype=F64)
        if trial % 3 == 0:
            d = (d * 4).round() / 4  # many ties
        d = (d + d.T) / 2
        d[torch.rand(k, k, generator=g) < 0.5] = math.inf
        d = torch.minimum(d, d.T)
        d.fill_diagonal_(math.inf)
        assert torch.equal(_greedy_matching(d.clone()), naive_greedy(d))


def test_two_close_merge_and_far_one_stays():
    means = on_line([0.0, 1e-4, 0.5])
    result = merge_components(means, isotropic(3), None, None, tau_w2sq=1e-4)
    assert isinstance(result, MergeResult)
    assert result.means.shape == (2, 2) and result.rounds == 1
    assert result.mapping.tolist() == [0, 0, 1]
    torch.testing.assert_close(result.means[0], means[:2].mean(0))
    torch.testing.assert_close(result.means[1], means[2])
    assert result.weights.tolist() == [2.0, 1.0]


def test_authors_rule_averages_means_and_covariances_whatever_the_counts():
    means = on_line([0.0, 1e-4])
    covs = torch.stack([isotropic(1, 1e-6)[0], isotropic(1, 3e-6)[0]])
    result = merge_components(means, covs, torch.tensor([1.0, 9.0], dtype=F64), None, tau_w2sq=1e-4)
    torch.testing.assert_close(result.means[0], means.mean(0))
    torch.testing.assert_close(result.covs[0], isotropic(1, 2e-6)[0])
    assert result.weights.tolist() == [10.0]


def test_none_thresholds_are_ignored():
    means = on_line([0.0, 0.3, 0.6, 5.0])
    result = merge_components(means, isotropic(4), None, None, tau_w2sq=None)
    assert result.means.shape[0] == 1 and result.mapping.tolist() == [0, 0, 0, 0]
    blocked = merge_components(means, isotropic(4), None, None, tau_w2sq=None, tau_var=None, tau_grad=None, max_rounds=0)
    assert blocked.means.shape[0] == 4 and blocked.rounds == 0


def test_tau_grad_needs_a_small_gradient_at_both_centres():
    means = on_line([0.0, 1e-4])
    grads = torch.tensor([0.1, 0.2], dtype=F64)
    assert merge_components(means, isotropic(2), None, grads, tau_w2sq=1e-4, tau_grad=0.15).means.shape[0] == 2
    assert merge_components(means, isotropic(2), None, grads, tau_w2sq=1e-4, tau_grad=0.25).means.shape[0] == 1
    # Equal gradients do not help: the values are compared, not their difference.
    same = torch.tensor([0.2, 0.2], dtype=F64)
    assert merge_components(means, isotropic(2), None, same, tau_w2sq=1e-4, tau_grad=0.15).means.shape[0] == 2
    assert merge_components(means, isotropic(2), None, grads, tau_w2sq=1e-4, tau_grad=None).means.shape[0] == 1


def test_tau_var_is_the_authors_pooled_variance_below_it_at_both_centres():
    means = torch.tensor([[0.05, 0.05], [0.05 + 1e-4, 0.05]], dtype=F64)  # equal coordinates: no gap term
    covs = torch.stack([isotropic(1, 1e-6)[0], isotropic(1, 2e-6)[0]])  # pooled variances 1e-6 and 2e-6
    assert merge_components(means, covs, None, None, tau_w2sq=1e-4, tau_var=1.5e-6).means.shape[0] == 2
    assert merge_components(means, covs, None, None, tau_w2sq=1e-4, tau_var=2.5e-6).means.shape[0] == 1
    # The pooled statistic also counts the gap between the mean and the std coordinate:
    # narrow components far from mu = sigma never pass (the authors' torch.var over both columns).
    far = torch.tensor([[0.2, 0.01], [0.2 + 1e-4, 0.01]], dtype=F64)
    assert merge_components(far, isotropic(2, 1e-8), None, None, tau_w2sq=1e-4, tau_var=1e-3).means.shape[0] == 2


def test_pooled_variance_is_torch_var_over_the_members_values():
    """The closed form in a component's moments equals the authors' torch.var(members)."""
    generator = torch.Generator().manual_seed(0)
    members = torch.randn(200_000, 2, generator=generator, dtype=F64) @ torch.tensor([[0.02, 0.0], [0.003, 0.004]], dtype=F64)
    members += torch.tensor([0.07, 0.015], dtype=F64)
    mean, cov = members.mean(0), torch.cov(members.T, correction=0)
    expected = torch.var(members, correction=0)  # over both columns pooled, as torch.var(x) without dim
    torch.testing.assert_close(pooled_variance(mean[None], cov[None])[0], expected, rtol=1e-10, atol=0)


def test_tau_overlap_compares_the_distance_with_the_pair_s_own_spread():
    means = on_line([0.0, 0.002])  # W2^2 = 4e-6 with equal covariances
    narrow, wide = isotropic(2, 1e-6), isotropic(2, 3e-6)  # mean traces 2e-6 and 6e-6
    assert merge_components(means, narrow, None, None, None, tau_overlap=1.0).means.shape[0] == 2
    assert merge_components(means, wide, None, None, None, tau_overlap=1.0).means.shape[0] == 1
    assert merge_components(means, narrow, None, None, None, tau_overlap=2.5).means.shape[0] == 1
    # Scale-free: the same picture in other units merges the same way.
    assert merge_components(means * 10, wide * 100, None, None, None, tau_overlap=1.0).means.shape[0] == 1
    with pytest.raises(ValueError, match="tau_overlap"):
        merge_components(means, narrow, None, None, None, tau_overlap=-1.0)


def test_threshold_is_on_the_squared_w2():
    means = on_line([0.0, 0.05])  # equal covariances: W2 = 0.05, W2^2 = 0.0025
    assert merge_components(means, isotropic(2), None, None, tau_w2sq=0.002).means.shape[0] == 2
    assert merge_components(means, isotropic(2), None, None, tau_w2sq=0.003).means.shape[0] == 1


def test_neighbours_count_the_component_itself_as_the_authors_topk_does():
    # 0 and 1 are close in W2 (narrow, 0.1 apart); the wide component 2 sits between them,
    # so it is the nearest other centre of both, and far from both in W2.
    means = on_line([0.0, 0.1, 0.05])
    covs = torch.stack([isotropic(1, 1e-6)[0], isotropic(1, 1e-6)[0], isotropic(1, 1.0)[0]])
    assert merge_components(means, covs, None, None, tau_w2sq=0.02).mapping.tolist() == [0, 0, 1]
    # topk(k=2) is the component and its nearest other centre (2): the pair 0-1 is not tested.
    assert merge_components(means, covs, None, None, tau_w2sq=0.02, neighbours=2).rounds == 0
    # topk(k=3): itself and two others, so 0 and 1 see each other.
    assert merge_components(means, covs, None, None, tau_w2sq=0.02, neighbours=3).mapping.tolist() == [0, 0, 1]
    with pytest.raises(ValueError, match="neighbours"):
        merge_components(means, covs, None, None, tau_w2sq=0.02, neighbours=1)


def test_chain_of_four_ends_as_one_over_two_rounds():
    means = on_line([0.0, 0.1, 0.2, 0.3])
    result = merge_components(means, isotropic(4), None, None, tau_w2sq=0.25**2, rule="barycenter")
    assert result.rounds == 2
    assert result.mapping.tolist() == [0, 0, 0, 0]
    torch.testing.assert_close(result.means[0], means.mean(0))


def test_mapping_composes_over_rounds_with_shuffled_components():
    xs = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7] + [5.0, 5.1, 5.2, 5.3]
    perm = torch.randperm(len(xs), generator=torch.Generator().manual_seed(1))
    means = on_line(xs)[perm]
    group = torch.tensor([0] * 8 + [1] * 4)[perm]
    result = merge_components(means, isotropic(len(xs)), None, None, tau_w2sq=1.0, rule="barycenter")
    assert result.means.shape[0] == 2 and result.rounds == 3
    # Same final component for exactly the members of one group.
    assert torch.equal(result.mapping[:, None] == result.mapping[None, :], group[:, None] == group[None, :])
    for new in range(2):
        members = result.mapping == new
        torch.testing.assert_close(result.means[new], means[members].mean(0))
        assert result.weights[new] == members.sum()


def test_matches_loop_reference_and_conserves_weights():
    g = torch.Generator().manual_seed(2)
    k = 40
    means = torch.rand(k, 2, dtype=F64, generator=g) * torch.tensor([0.4, 0.05], dtype=F64)
    a = torch.randn(k, 2, 2, dtype=F64, generator=g) * 3e-3
    covs = a @ a.mT + 1e-6 * torch.eye(2, dtype=F64)
    weights = torch.rand(k, dtype=F64, generator=g) + 0.1
    result = merge_components(means, covs, weights, None, tau_w2sq=0.06**2, rule="barycenter")
    ref_means, ref_covs, ref_weights, groups = naive_merge(means, covs, weights, 0.06**2)
    assert result.rounds >= 2 and result.means.shape[0] == len(groups)
    torch.testing.assert_close(result.weights.sum(), weights.sum())
    for new, members in enumerate(groups):
        assert sorted(members) == (result.mapping == result.mapping[members[0]]).nonzero().squeeze(1).tolist()
        target = int(result.mapping[members[0]])
        torch.testing.assert_close(result.means[target], ref_means[new])
        torch.testing.assert_close(result.covs[target], ref_covs[new])
        torch.testing.assert_close(result.weights[target], ref_weights[new])


def test_moments_rule_gives_moments_of_all_members():
    g = torch.Generator().manual_seed(3)
    means = torch.randn(6, 2, dtype=F64, generator=g) * 0.01
    covs = isotropic(6, 1e-4) * (1 + torch.rand(6, 1, 1, dtype=F64, generator=g))
    weights = torch.rand(6, dtype=F64, generator=g) + 0.5
    result = merge_components(means, covs, weights, None, tau_w2sq=None, rule="moments")
    p = weights / weights.sum()
    mean = (p[:, None] * means).sum(0)
    diff = means - mean
    cov = (p[:, None, None] * (covs + diff[:, :, None] * diff[:, None, :])).sum(0)
    torch.testing.assert_close(result.means[0], mean)
    torch.testing.assert_close(result.covs[0], cov)


def test_paper_rule_runs_unweighted():
    means = on_line([0.0, 1e-4])
    result = merge_components(means, isotropic(2), torch.tensor([1.0, 3.0]), None, tau_w2sq=1e-4, rule="paper")
    torch.testing.assert_close(result.means[0], means.mean(0))
    spread = torch.tensor([[1e-8 / 8, 0.0], [0.0, 0.0]], dtype=F64)  # (m1 - m2)(m1 - m2)^T / 8
    torch.testing.assert_close(result.covs[0], 1.5 * isotropic(1)[0] + spread, rtol=1e-10, atol=1e-15)


def test_bad_arguments_raise():
    means, covs = on_line([0.0, 1.0]), isotropic(2)
    with pytest.raises(ValueError, match="authors, barycenter, moments, paper"):
        merge_components(means, covs, None, None, 0.1, rule="midpoint")
    with pytest.raises(ValueError, match="tau_w2sq"):
        merge_components(means, covs, None, None, -1.0)
    with pytest.raises(ValueError, match="grad_at_centres is None"):
        merge_components(means, covs, None, None, 0.1, tau_grad=0.1)
    with pytest.raises(ValueError, match="K=2"):
        merge_components(means, covs, torch.ones(3), None, 0.1)
    with pytest.raises(ValueError, match=r"\[K, 2, 2\]"):
        merge_components(means, isotropic(3), None, None, 0.1)
