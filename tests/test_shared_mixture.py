"""The 2DGBNN guide and stage 2 as a whole: tying, gradients, the KL bound, saving plans."""

import math

import pytest
import torch
from torch import nn

from pyro_gbnn import (
    AnalyticKL_ELBO,
    BayesianNetwork,
    Categorical,
    IIDNormalPrior,
    LayerwiseNormalPrior,
    MeanFieldGuide,
)
from pyro_gbnn.checkpoint import load_checkpoint, save_checkpoint
from pyro_gbnn.guides.shared_mixture import SharedMixtureGuide
from pyro_gbnn.sharing.build import SharingSettings, build_sharing_plan
from pyro_gbnn.sharing.plan import SharingPlan, index_dtype
from pyro_gbnn.stages import count_trainable


def small_bnn(prior=None, estimator="weight"):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    return BayesianNetwork(net, prior or IIDNormalPrior(0.0, 0.3), Categorical(100), estimator=estimator)


def trained_like_moments(bnn):
    """(loc, scale) clouds shaped like a trained BNN's: a few clusters of scales, spread-out means."""
    guide = MeanFieldGuide(bnn, init_scale=0.05)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name in guide.site_shapes:
            key = name.replace(".", "/")
            shape = guide.loc[key].shape
            guide.loc[key].copy_(0.1 * torch.randn(shape, generator=gen))
            level = torch.tensor([0.01, 0.03, 0.06])[torch.randint(0, 3, shape, generator=gen)]
            scale = level * (1 + 0.1 * torch.randn(shape, generator=gen)).abs()
            guide.rho[key].copy_(scale + torch.log(-torch.expm1(-scale)))
    return guide


def make_plan(bnn, **settings):
    guide = trained_like_moments(bnn)
    grads = {n: torch.rand(s, generator=torch.Generator().manual_seed(2)) for n, s in bnn.site_shapes.items()}
    defaults = dict(num_components=12, min_cluster_size=5, gmm_max_epochs=30, merge_tau_w2sq=1e-6)
    return build_sharing_plan(guide.posterior_moments(), grads, SharingSettings(**(defaults | settings)))


def test_plan_gives_every_weight_one_role_and_counts_add_up():
    bnn = small_bnn()
    plan = make_plan(bnn)
    plan.check()
    n = sum(s.numel() for s in bnn.site_shapes.values())
    assert plan.num_weights == n
    assert plan.outlier_index.numel() + plan.inlier_index.numel() + plan.ellipse_index.numel() == n
    assert plan.outlier_index.numel() >= math.ceil(0.01 * n)
    assert torch.allclose(plan.counts.sum(), torch.tensor(float(n - plan.outlier_index.numel())), rtol=1e-5)
    assert plan.inlier_component.dtype == index_dtype(plan.num_components) == torch.uint8
    assert torch.allclose(plan.ellipse_alphas.sum(-1), torch.ones(plan.ellipse_index.numel()), atol=1e-5)


def test_ablation_switches():
    bnn = small_bnn()
    no_out = make_plan(bnn, tau_w=None, top_grad_fraction=None, min_cluster_size=1)
    assert no_out.outlier_index.numel() == 0
    no_blend = make_plan(bnn, blend=False)
    assert no_blend.ellipse_index.numel() == 0
    unmerged = make_plan(bnn, merge=False)
    assert unmerged.num_components >= make_plan(bnn, merge_tau_w2sq=100.0, merge_neighbours=None).num_components


def test_blend_rules_every_and_own():
    """``own`` blends every weight outside its own component's ellipse (the authors' code);
    ``every`` first moves such a weight to a component whose ellipse holds it."""
    from pyro_gbnn.sharing.gaussians import mahalanobis2

    bnn = small_bnn()
    settings = dict(merge=False, mahalanobis_threshold=2.0)  # a tight ellipse, so both rules have work
    every, own = make_plan(bnn, **settings), make_plan(bnn, blend_rule="own", **settings)
    assert own.ellipse_index.numel() > every.ellipse_index.numel() > 0
    assert set(every.ellipse_index.tolist()) <= set(own.ellipse_index.tolist())
    moments = trained_like_moments(bnn).posterior_moments()
    points = torch.cat([torch.stack([m.reshape(-1), s.reshape(-1)], -1) for m, s in moments.values()]).double()
    d2 = mahalanobis2(points[every.ellipse_index], every.means.double(), every.covs.double())
    assert bool((d2 > 2.0).all()), "every: an ellipse weight lies outside every component's ellipse"
    moved = sorted(set(own.ellipse_index.tolist()) - set(every.ellipse_index.tolist()))
    d2_moved = mahalanobis2(points[moved], every.means.double(), every.covs.double())
    assert bool((d2_moved.min(1).values <= 2.0).all()), "own blends weights that another ellipse holds"
    with pytest.raises(ValueError, match="blend_rule"):
        make_plan(bnn, blend_rule="nearest")


def test_mixture_is_fitted_to_a_seeded_subset_and_assigns_every_inlier():
    bnn = small_bnn()
    full, subset = make_plan(bnn, merge=False), make_plan(bnn, merge=False, gmm_max_points=300)
    assert subset.report["gmm_points"] == 300 < full.report["gmm_points"]
    assert subset.num_weights == full.num_weights
    assert subset.inlier_index.numel() + subset.ellipse_index.numel() + subset.outlier_index.numel() == subset.num_weights
    again = make_plan(bnn, merge=False, gmm_max_points=300)
    assert torch.equal(again.means, subset.means), "the subset is seeded"
    assert not torch.equal(subset.means, full.means)



def test_passes_in_chunks_give_the_plan_of_one_pass(monkeypatch):
    """Assigning, the merge's gradient sums and the ellipse tests go through the inliers a
    chunk at a time (memory at ImageNet size); the chunks change nothing in the plan."""
    import pyro_gbnn.sharing.build as build

    bnn = small_bnn()
    settings = dict(merge_tau_w2sq=None, merge_tau_overlap=2.0, merge_tau_var=None, mahalanobis_threshold=2.0)
    whole = make_plan(bnn, **settings)
    monkeypatch.setattr(build, "_POINTS_PER_PASS", 61)
    chunked = make_plan(bnn, **settings)
    assert whole.report["merge_rounds"] > 0 and whole.ellipse_index.numel() > 0, "every chunked pass has work"
    assert chunked.inlier_index.numel() > 10 * 61
    for field in ("means", "covs", "counts", "outlier_index", "inlier_index", "inlier_component", "ellipse_index",
                  "ellipse_components", "ellipse_alphas"):
        assert torch.equal(getattr(chunked, field), getattr(whole, field)), field

def test_saved_plan_reloads_bit_exactly(tmp_path):
    plan = make_plan(small_bnn())
    save_checkpoint(tmp_path / "plan.pt", {"plan": plan.to_state()})
    loaded = SharingPlan.from_state(load_checkpoint(tmp_path / "plan.pt")["plan"])
    assert plan.merged_from is not None
    for field, value in plan.to_state().items():
        other = getattr(loaded, field)
        if isinstance(value, torch.Tensor):
            assert value.dtype == other.dtype and torch.equal(value, other), field
        elif field == "merged_from":
            assert all(torch.equal(value[k], other[k]) for k in ("means", "covs"))
        else:
            assert value == other, field
    older = {k: v for k, v in plan.to_state().items() if k != "merged_from"}  # plans saved before it existed
    assert SharingPlan.from_state(older).merged_from is None


def test_tied_guide_shares_one_draw_per_component_and_redraws_across_samples():
    bnn = small_bnn()
    plan = make_plan(bnn)
    guide = SharedMixtureGuide(bnn, plan, semantics="tied")
    flat = torch.cat([w.reshape(2, -1) for w in guide.sample_weights(2).values()], -1)
    comps = plan.inlier_component.long()
    for k in comps.unique()[:5]:
        members = flat[:, plan.inlier_index[comps == k]]
        assert torch.all(members[0] == members[0, 0]), "one value per component within a sample"
        if members.shape[1]:
            assert members[0, 0] != members[1, 0], "a new value in the next sample"
    outliers = flat[:, plan.outlier_index]
    assert outliers.unique().numel() > 0.9 * outliers.numel()


def test_independent_guide_draws_each_weight_separately_with_component_moments():
    bnn = small_bnn()
    plan = make_plan(bnn)
    guide = SharedMixtureGuide(bnn, plan, semantics="independent")
    draws = torch.cat([w.reshape(4000, -1) for w in guide.sample_weights(4000).values()], -1)
    k = plan.inlier_component.long()[0]
    members = plan.inlier_index[plan.inlier_component.long() == k]
    values = draws[:, members]
    assert values[0].unique().numel() == members.numel()
    expected_std = guide.component_scale()[k].item()
    assert abs(values.std().item() - expected_std) < 0.05 * expected_std + 3 * expected_std / math.sqrt(values.numel())


COMBINATIONS = [("tied", "weight"), ("tied", "anchor"), ("hierarchical", "weight"), ("independent", "weight")]


@pytest.mark.parametrize(("semantics", "prior"), COMBINATIONS)
def test_trainable_values_are_exactly_those_that_reach_the_objective(semantics, prior):
    bnn = small_bnn(estimator="local")
    guide = SharedMixtureGuide(bnn, make_plan(bnn), semantics=semantics, prior=prior)
    per_component = {"tied": 2, "hierarchical": 5, "independent": 2}[semantics] if prior == "weight" else 5
    assert count_trainable(guide) == per_component * guide.num_components + 2 * guide.outlier_loc.numel()
    frozen = [p for p in guide.parameters() if not p.requires_grad]
    assert len(frozen) == 5 - per_component
    for p in frozen:
        p.requires_grad_(True)
    x, y = torch.randn(6, 1, 6, 6), torch.randint(0, 10, (6,))
    elbo = AnalyticKL_ELBO(bnn, guide)
    if prior == "anchor":  # at the anchor its KL is flat: move off it so every coupling shows
        with torch.no_grad():
            for p in guide.parameters():
                p.add_(1e-3 * torch.randn_like(p))
    elbo(x, y).backward()
    trained = {name for name, p in guide.named_parameters() if all(q is not p for q in frozen)}
    for name, p in guide.named_parameters():
        if name in trained:
            assert p.grad is not None and bool((p.grad != 0).all()), f"{name} gets no gradient in some entry"
        else:
            assert p.grad is None or bool((p.grad == 0).all()), f"{name} is frozen but reaches the objective"


def test_anchor_prior_is_refused_outside_the_tied_semantics():
    bnn = small_bnn()
    with pytest.raises(ValueError, match="tied semantics only"):
        SharedMixtureGuide(bnn, make_plan(bnn), semantics="hierarchical", prior="anchor")


@pytest.mark.parametrize("prior", [IIDNormalPrior(0.0, 0.3), LayerwiseNormalPrior("radford")])
def test_independent_kl_bound_is_above_a_monte_carlo_estimate_of_the_true_kl(prior):
    bnn = small_bnn(prior)
    plan = make_plan(bnn)
    assert plan.ellipse_index.numel() > 0, "the bound matters for blended weights"
    guide = SharedMixtureGuide(bnn, plan, semantics="independent")
    bound = guide.kl_divergence().item()
    loc, scale = guide.weight_moments()
    prior_loc = torch.cat([bnn.prior_distribution(n).base_dist.loc.expand(s).reshape(-1) for n, s in bnn.site_shapes.items()])
    prior_scale = torch.cat([bnn.prior_distribution(n).base_dist.scale.expand(s).reshape(-1) for n, s in bnn.site_shapes.items()])
    q, p = torch.distributions.Normal(loc.detach(), scale.detach()), torch.distributions.Normal(prior_loc, prior_scale)
    n = 400
    w = q.sample((n,))
    estimates = (q.log_prob(w) - p.log_prob(w)).sum(-1)
    true_kl = estimates.mean().item()
    tolerance = 5 * estimates.std().item() / math.sqrt(n)
    assert bound >= true_kl - tolerance
    assert bound > torch.distributions.kl_divergence(q, p).sum().item(), "strict for blended weights"


def test_paper_weighting_shrinks_the_mixture_term():
    bnn = small_bnn()
    plan = make_plan(bnn)
    summed = SharedMixtureGuide(bnn, plan, semantics="independent", kl_weighting="sum")
    paper = SharedMixtureGuide(bnn, plan, semantics="independent", kl_weighting="paper")
    assert paper.kl_divergence() < summed.kl_divergence()


def test_bad_choices_are_named():
    bnn = small_bnn()
    plan = make_plan(bnn)
    with pytest.raises(ValueError, match="semantics 'shared' is unknown"):
        SharedMixtureGuide(bnn, plan, semantics="shared")
    other = BayesianNetwork(nn.Linear(3, 2), IIDNormalPrior(), Categorical(1))
    with pytest.raises(ValueError, match="made for another network"):
        SharedMixtureGuide(other, plan)


TWINS_ONLY = SharingSettings(merge_tau_w2sq=1e-12, merge_neighbours=None, merge_tau_grad_step=None, merge_tau_var=None)


def guide_with_twin_components(semantics):
    """A guide whose components 0 and 1 have been made identical, so exactly they merge."""
    bnn = small_bnn(estimator="local")
    guide = SharedMixtureGuide(bnn, make_plan(bnn), semantics=semantics)
    with torch.no_grad():
        for name in ("centre_mu", "centre_rho", "chol_log_00", "chol_10", "chol_log_11"):
            getattr(guide, name)[1] = getattr(guide, name)[0]
    return bnn, guide


@pytest.mark.parametrize("semantics", ["tied", "hierarchical", "independent"])
def test_merging_during_fine_tuning_retires_a_slot_that_then_never_moves(semantics):
    bnn, guide = guide_with_twin_components(semantics)
    counts = guide.counts.clone()
    members_of_1 = guide.inlier_component.long() == 1
    elbo = AnalyticKL_ELBO(bnn, guide)
    optimizer = torch.optim.Adam([p for p in elbo.parameters() if p.requires_grad], lr=1e-2)
    x, y = torch.randn(6, 1, 6, 6), torch.randint(0, 10, (6,))
    optimizer.zero_grad()
    elbo(x, y).backward()
    optimizer.step()
    with torch.no_grad():  # the step moved them apart a little: make them twins again
        for name in ("centre_mu", "centre_rho", "chol_log_00", "chol_10", "chol_log_11"):
            getattr(guide, name)[1] = getattr(guide, name)[0]
    kl_twins = guide.kl_divergence().item()
    retired = guide.merge_close_components(optimizer, TWINS_ONLY)
    assert retired == 1 and guide.alive.tolist()[:2] == [True, False]
    assert bool((guide.inlier_component.long()[members_of_1] == 0).all())
    assert torch.allclose(guide.counts.sum(), counts.sum()) and guide.counts[1] == 0
    assert guide.counts[0] == counts[0] + counts[1]
    if semantics == "tied":  # one KL per component: the twin's term is gone
        assert guide.kl_divergence().item() < kl_twins
    else:  # one KL per weight: relabelling members between identical components changes nothing
        assert abs(guide.kl_divergence().item() - kl_twins) < 1e-4 * abs(kl_twins)
    frozen = {name: getattr(guide, name)[1].item() for name in ("centre_mu", "centre_rho", "chol_log_00", "chol_10", "chol_log_11")}
    for _ in range(2):
        optimizer.zero_grad()
        elbo(x, y).backward()
        optimizer.step()
    for name, value in frozen.items():
        assert getattr(guide, name)[1].item() == value, f"retired {name} moved"
    plan = guide.plan()
    plan.check()
    assert plan.num_components == guide.num_components - 1
    assert guide.num_trainable_values() < count_trainable(guide)


def test_the_plan_of_a_merged_guide_rebuilds_the_same_posterior():
    bnn, guide = guide_with_twin_components("independent")
    guide.merge_close_components(None, TWINS_ONLY)
    rebuilt = SharedMixtureGuide(bnn, guide.plan(), semantics="independent")
    for mine, theirs in zip(guide.weight_moments(), rebuilt.weight_moments()):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(guide.kl_divergence(), rebuilt.kl_divergence(), rtol=1e-5, atol=1e-4)
