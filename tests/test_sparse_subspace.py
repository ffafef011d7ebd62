"""SSVI guide: a fixed-size sparse subspace stored as values and indices only, the paper's
removal criteria and addition rules, the KL of the active weights, and exact resumption."""

import copy
import math

import pyro
import pytest
import torch
from pyro import poutine
from pyro.distributions.kl import kl_divergence
from torch import nn

from pyro_gbnn.bayesian import BayesianNetwork
from pyro_gbnn.elbo import AnalyticKL_ELBO
from pyro_gbnn.guides.base import site_key
from pyro_gbnn.guides.mean_field import MeanFieldGuide, inverse_softplus
from pyro_gbnn.guides.sparse_subspace import SparseNormal, SparseSubspaceGuide, removal_score
from pyro_gbnn.likelihoods import Categorical
from pyro_gbnn.priors import IIDNormalPrior, ScaleMixturePrior
from pyro_gbnn.reparameterization import record_weight_distributions


@pytest.fixture(autouse=True)
def _one_thread(_seed_and_threads):
    # These networks are tiny: a second intra-op thread only adds waiting on a shared machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))


def tiny(density=0.3, estimator="local", prior=None, **kwargs):
    bnn = BayesianNetwork(mlp(), prior or IIDNormalPrior(), Categorical(32), estimator=estimator)
    return bnn, SparseSubspaceGuide(bnn, density, **kwargs)


def batch():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(32, 5, generator=generator), torch.randint(0, 3, (32,), generator=generator)


def make_optimizer(kind, guide):
    groups = [{"params": list(guide.loc_parameters())}, {"params": list(guide.scale_parameters())}]
    if kind == "adam":
        return torch.optim.Adam(groups, lr=0.05, weight_decay=1e-3)
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=0.05, weight_decay=1e-2)
    return torch.optim.SGD(groups, lr=0.2, momentum=0.9, nesterov=True, weight_decay=5e-4)


def svi_step(elbo, guide, optimizer, x, y):
    optimizer.zero_grad()
    (elbo(x, y) / len(x)).backward()
    optimizer.step()
    guide.after_step(optimizer)


def dense(guide, name):
    """(mu, sigma) of site ``name`` in the weight's shape, 0 off the subspace."""
    q = guide.distribution(name).base_dist
    return q.loc.detach(), q.scale.detach()


def test_budget_is_exactly_s_split_uniformly_over_sites():
    bnn, guide = tiny(density=0.3)
    total = sum(s.numel() for s in guide.site_shapes.values())
    assert guide.num_active() == round(0.3 * total) == 22
    for name, shape in guide.site_shapes.items():
        assert int(guide.active_mask(name).sum()) == guide.budget[name]
        assert abs(guide.budget[name] - 0.3 * shape.numel()) < 1
    assert guide.density() == pytest.approx(22 / total)
    _, dense = tiny(density=0.6, dense_sites=["0.weight"])
    assert dense.active_mask("0.weight").all() and dense.num_active() == round(0.6 * total)
    assert dense.active_mask("2.weight").sum() < 24


@pytest.mark.parametrize("optimizer, addition", [("adam", "gradient"), ("sgd", "gradient"), ("adamw", "random")])
def test_training_keeps_s_distinct_active_weights_and_restarts_replaced_slots(optimizer, addition):
    bnn, guide = tiny(density=0.3, update_every=3, replacement_rate=0.5, total_steps=60, addition=addition)
    elbo, opt, (x, y) = AnalyticKL_ELBO(bnn, guide), make_optimizer(optimizer, guide), batch()
    s, replaced = guide.num_active(), 0
    first = {k: v.detach().clone() for k, v in guide.loc.items()}
    for _ in range(30):
        slots = {k: i.clone() for k, i in guide.index.named_buffers()}
        svi_step(elbo, guide, opt, x, y)
        assert guide.num_active() == s
        for name, shape in guide.site_shapes.items():
            key, index = site_key(name), guide.index[site_key(name)]
            assert index.dtype == torch.int32 and guide.loc[key].shape == guide.rho[key].shape == (guide.budget[name],)
            assert (index.diff() > 0).all(), "slots are distinct positions in flat-index order"
            assert 0 <= int(index.min()) and int(index.max()) < shape.numel()
            changed = ~torch.isin(index, slots[key])  # the slots of the weights added by this step
            replaced += int(changed.sum())
            assert (guide.loc[key][changed] == 0).all(), "an added weight starts at mu = 0"
            for param in (guide.loc[key], guide.rho[key]):
                for value in opt.state[param].values():
                    if value.shape == param.shape:
                        assert (value[changed] == 0).all(), "a replaced slot starts with zero optimizer state"
    assert replaced > 0 and int(guide.step_count) == 30
    moved = [not torch.equal(first[k], v) for k, v in guide.loc.items()]
    assert any(moved)


def test_parameters_gradients_and_optimizer_state_scale_with_the_density():
    """Nothing the guide or Adam keeps has the dense network's size: 2s values, s int32 positions, 4s moments."""
    bnn = BayesianNetwork(nn.Linear(400, 300), IIDNormalPrior(), Categorical(32), estimator="local")
    guide = SparseSubspaceGuide(bnn, 0.05, update_every=1, total_steps=10)
    s, dense = guide.num_active(), sum(shape.numel() for shape in guide.site_shapes.values())
    assert s == round(0.05 * dense)
    elbo, opt = AnalyticKL_ELBO(bnn, guide), make_optimizer("adam", guide)
    x, y = torch.randn(32, 400), torch.randint(0, 3, (32,))
    svi_step(elbo, guide, opt, x, y)
    assert sum(p.numel() for p in guide.parameters()) == 2 * s
    assert sum(p.grad.numel() for p in guide.parameters()) == 2 * s
    # loc, rho, index; a step counter and one initial scale per site
    assert sum(t.numel() for t in guide.state_dict().values()) == 3 * s + 1 + len(guide.site_shapes)
    moments = [v for state in opt.state.values() for v in state.values() if torch.is_tensor(v) and v.dim()]
    assert sum(v.numel() for v in moments) == 4 * s


def test_sparse_normal_draws_match_its_moments_on_the_active_entries_and_are_zero_elsewhere():
    index = torch.tensor([1, 4, 5], dtype=torch.int32)
    loc, scale = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([0.1, 0.3, 1.0])
    q = SparseNormal(index, loc, scale, torch.Size([2, 3]))
    assert torch.equal(q.loc.view(-1), torch.tensor([0.0, 0.5, 0, 0, -1.0, 2.0]))
    assert torch.equal(q.scale.view(-1), torch.tensor([0.0, 0.1, 0, 0, 0.3, 1.0]))
    draws = q.sample((200_000,)).view(200_000, -1)
    assert draws.shape == (200_000, 6) and (draws[:, [0, 2, 3]] == 0).all()
    assert torch.allclose(draws[:, [1, 4, 5]].mean(0), loc, atol=5 * 1.0 / 200_000**0.5)
    assert torch.allclose(draws[:, [1, 4, 5]].std(0), scale, rtol=0.01)
    values = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)
    SparseNormal(index, values, scale, torch.Size([2, 3])).rsample().sum().backward()
    assert torch.equal(values.grad, torch.ones(3)), "draws are differentiable in the active values"


@pytest.mark.parametrize("estimator", ["weight", "local", "flipout"])
def test_inactive_weights_are_exactly_zero_in_every_draw(estimator):
    bnn, guide = tiny(density=0.25, estimator=estimator, update_every=1, replacement_rate=0.5, total_steps=100)
    elbo, opt, (x, y) = AnalyticKL_ELBO(bnn, guide), make_optimizer("adam", guide), batch()
    for _ in range(4):
        with record_weight_distributions():
            trace = poutine.trace(guide).get_trace()
            out = poutine.replay(bnn, trace=trace)(x)
        assert torch.isfinite(out).all()
        for name in guide.site_shapes:
            assert (trace.nodes[name]["value"][~guide.active_mask(name)] == 0).all()
        svi_step(elbo, guide, opt, x, y)
    draws = guide.sample_weights(50)
    for name, value in draws.items():
        mask = guide.active_mask(name)
        assert (value[:, ~mask] == 0).all() and (value[:, mask] != 0).all()


@pytest.mark.parametrize("estimator", ["weight", "local", "flipout"])
def test_addition_gradient_is_the_dense_gradient_of_the_layer_location(estimator):
    """loss = sum(c * out) with out = x W^T (+ noise): d loss / d W = c^T x, inactive entries included."""
    bnn = BayesianNetwork(nn.Linear(4, 2, bias=False), IIDNormalPrior(), Categorical(1), estimator=estimator)
    guide = SparseSubspaceGuide(bnn, 0.5, update_every=1, total_steps=100, init_scale=0.3)
    x, c = torch.randn(5, 4), torch.randn(5, 2)
    with record_weight_distributions():
        trace = poutine.trace(guide).get_trace()
        out = poutine.replay(bnn, trace=trace)(x)
    (c * out).sum().backward()
    assert torch.allclose(guide._grads["weight"], c.T @ x, atol=1e-5)


def test_folded_normal_mean_and_snr_match_monte_carlo():
    mu = torch.tensor([0.0, 0.3, -0.8, 1.5, 0.05])
    sigma = torch.tensor([1.0, 0.5, 0.4, 0.5, 0.2])
    draws = (mu + sigma * torch.randn(400_000, 5, dtype=torch.float64)).abs()
    mean, sd = draws.mean(0), draws.std(0)
    # standard errors: sd / sqrt(n) for the mean, and about the same relative error for the SNR
    assert torch.allclose(removal_score(mu, sigma, "mean_abs"), mean, atol=5 * float(sd.max()) / 400_000**0.5)
    assert torch.allclose(removal_score(mu, sigma, "snr_abs"), mean / sd, rtol=5e-3)
    assert float(removal_score(torch.zeros(1), torch.ones(1), "snr_abs")) == pytest.approx(
        math.sqrt(2 / math.pi) / math.sqrt(1 - 2 / math.pi)
    )
    far = removal_score(torch.tensor([1.0, 1.0]), torch.tensor([1e-4, 1e-30]), "snr_abs")
    assert torch.isfinite(far).all() and float(far[0]) == pytest.approx(1e4, rel=1e-6)
    z = torch.linspace(0.01, 30, 3000, dtype=torch.float64)
    assert (removal_score(z, torch.ones_like(z), "snr_abs").diff() > 0).all(), "SNR(|theta|) ranks like |mu| / sigma"
    assert torch.equal(removal_score(mu, sigma, "abs_mean"), mu.abs().double())


def handmade(removal="abs_mean", addition="random", rate=0.25, width=3):
    """One 2 x width weight, the first four entries active with (mu, sigma):
    0: (0.01, 0.05) lowest |mu|; 1: (-0.5, 10) lowest |mu|/sigma; 2: (0.03, 0.001) lowest E|theta|; 3: (2, 0.1)."""
    bnn = BayesianNetwork(nn.Linear(width, 2, bias=False), IIDNormalPrior(), Categorical(1), estimator="weight")
    guide = SparseSubspaceGuide(bnn, 4 / (2 * width), removal=removal, addition=addition, update_every=1,
                                replacement_rate=rate, total_steps=10**6)
    mask = torch.arange(2 * width) < 4
    mu = torch.zeros(2 * width)
    mu[:4] = torch.tensor([0.01, -0.5, 0.03, 2.0])
    sigma = torch.ones(2 * width)
    sigma[:4] = torch.tensor([0.05, 10.0, 0.001, 0.1])
    with torch.no_grad():
        guide.index["weight"].copy_(torch.arange(4))
        guide.loc["weight"].copy_(mu[mask])
        guide.rho["weight"].copy_(inverse_softplus(sigma[mask]))
    return bnn, guide


@pytest.mark.parametrize("removal, expected", [("abs_mean", 0), ("snr_abs", 1), ("mean_abs", 2)])
def test_each_removal_criterion_removes_its_lowest_active_entry(removal, expected):
    _, guide = handmade(removal)
    guide.after_step(None)
    mask = guide.active_mask("weight").view(-1)
    assert int(mask.sum()) == 4 and not mask[expected] and mask[[i for i in range(4) if i != expected]].all()
    added = int(guide.index["weight"][-1])
    assert added >= 4 and dense(guide, "weight")[0].view(-1)[added] == 0, "the added weight starts at mu = 0"


def test_gradient_addition_takes_the_largest_inactive_gradients_never_the_just_removed():
    _, guide = handmade("abs_mean", "gradient", rate=0.5, width=4)
    rho_survivors = guide.rho["weight"].detach()[[1, 3]].mean()
    c = torch.tensor([100.0, 100.0, 100.0, 100.0, 1.0, -5.0, 3.0, -0.5])
    draws = guide()
    (draws["weight"].view(-1) * c).sum().backward()
    guide.after_step(None)
    mask = guide.active_mask("weight").view(-1)
    assert mask.nonzero().view(-1).tolist() == [1, 3, 5, 6]
    loc, scale = dense(guide, "weight")
    assert (loc.view(-1)[[5, 6]] == 0).all()
    assert torch.allclose(scale.view(-1)[[5, 6]], torch.nn.functional.softplus(rho_survivors).expand(2))


def test_gradient_addition_without_a_backward_pass_is_an_error():
    _, guide = handmade("abs_mean", "gradient")
    with pytest.raises(RuntimeError, match="backward"):
        guide.after_step(None)


def test_added_scale_initial_uses_the_sites_initial_scale_and_updates_stop_at_total_steps():
    bnn = BayesianNetwork(nn.Linear(6, 4, bias=False), IIDNormalPrior(), Categorical(1))
    guide = SparseSubspaceGuide(bnn, 0.5, addition="random", added_scale="initial", init_scale=0.02,
                                update_every=2, replacement_rate=0.5, total_steps=5)
    before = guide.active_mask("weight").clone()
    guide.after_step(None)
    assert torch.equal(guide.active_mask("weight"), before), "no update between multiples of update_every"
    guide.after_step(None)
    added = guide.active_mask("weight") & ~before
    assert int(added.sum()) == round(guide.replacement_fraction(2) * 12) == 4
    assert torch.allclose(dense(guide, "weight")[1][added], torch.tensor(0.02))
    mask = guide.active_mask("weight").clone()
    for _ in range(6):
        guide.after_step(None)
        if int(guide.step_count) == 4:
            assert not torch.equal(guide.active_mask("weight"), mask)
            mask = guide.active_mask("weight").clone()
    assert torch.equal(guide.active_mask("weight"), mask), "no update at t >= total_steps"


def test_cosine_replacement_schedule():
    _, guide = tiny(replacement_rate=0.4, total_steps=1000)
    assert guide.replacement_fraction(0) == pytest.approx(0.4)
    assert guide.replacement_fraction(500) == pytest.approx(0.2)
    assert guide.replacement_fraction(250) == pytest.approx(0.2 * (1 + math.cos(math.pi / 4)))
    assert guide.replacement_fraction(1000) == pytest.approx(0.0, abs=1e-12)


def test_kl_is_the_mean_field_kl_of_the_active_weights_only():
    bnn, guide = tiny(density=0.4, prior=IIDNormalPrior(0.3, 0.7), init_scale=0.2)
    mean_field = MeanFieldGuide(bnn, init_scale=0.2)
    with torch.no_grad():
        for key in guide.loc:
            mean_field.loc[key].normal_()
            mean_field.rho[key].normal_()
            guide.loc[key].copy_(mean_field.loc[key].view(-1)[guide.index[key]])
            guide.rho[key].copy_(mean_field.rho[key].view(-1)[guide.index[key]])
    expected = 0.0
    for name in guide.site_shapes:
        per_weight = kl_divergence(mean_field.distribution(name).base_dist, bnn.prior_distribution(name).base_dist)
        expected = expected + per_weight[guide.active_mask(name)].sum()
    assert torch.allclose(guide.kl_divergence(bnn), expected)
    x, y = batch()
    assert torch.allclose(AnalyticKL_ELBO(bnn, guide).terms(x, y).kl, expected)


@pytest.mark.parametrize("addition", ["gradient", "random"])
def test_state_dict_round_trip_resumes_with_identical_updates(addition):
    def setup(init_seed):
        torch.manual_seed(init_seed)
        bnn, guide = tiny(density=0.3, addition=addition, update_every=3, replacement_rate=0.5, total_steps=40, seed=7)
        return bnn, guide, AnalyticKL_ELBO(bnn, guide), make_optimizer("adam", guide)

    x, y = batch()
    bnn, guide, elbo, opt = setup(0)
    for _ in range(7):
        svi_step(elbo, guide, opt, x, y)
    saved = copy.deepcopy(guide.state_dict()), copy.deepcopy(opt.state_dict())
    assert any(k.startswith("index.") for k in saved[0]) and "step_count" in saved[0]

    def continue_training(guide, elbo, opt):
        pyro.set_rng_seed(5)
        history = []
        for _ in range(9):
            svi_step(elbo, guide, opt, x, y)
            history.append({k: v.clone() for k, v in guide.state_dict().items()})
        return history

    reference = continue_training(guide, elbo, opt)
    _, resumed, resumed_elbo, resumed_opt = setup(123)
    resumed.load_state_dict(saved[0])
    resumed_opt.load_state_dict(saved[1])
    replay = continue_training(resumed, resumed_elbo, resumed_opt)
    assert any(not torch.equal(reference[0][k], reference[-1][k]) for k in reference[0] if k.startswith("index."))
    for ours, theirs in zip(reference, replay):
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_macs_ratio_and_size_bytes():
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 4))
    bnn = BayesianNetwork(net, IIDNormalPrior(), Categorical(1))
    guide = SparseSubspaceGuide(bnn, 0.25)
    assert [guide.budget[n] for n in guide.site_shapes] == [18, 1, 64, 1]
    assert guide.train_macs_ratio(bnn, (1, 2, 6, 6)) == pytest.approx(0.25)
    dense_conv = SparseSubspaceGuide(bnn, 0.25, dense_sites=["0.weight"])
    conv_macs, linear_macs = 4 * 4 * 4 * 2 * 9, 64 * 4
    linear_density = float(dense_conv.active_mask("3.weight").float().mean())
    expected = (conv_macs + linear_macs * linear_density) / (conv_macs + linear_macs)
    assert dense_conv.train_macs_ratio(bnn, (3, 2, 6, 6)) == pytest.approx(expected)
    # fp32 mu and sigma per active weight + per site min(bitmask, int32 indices)
    assert guide.size_bytes() == 8 * 84 + min(9, 72) + min(1, 4) + min(32, 256) + min(1, 4)
    sparse_bnn = BayesianNetwork(nn.Linear(100, 10, bias=False), IIDNormalPrior(), Categorical(1))
    assert SparseSubspaceGuide(sparse_bnn, 0.01).size_bytes() == 8 * 10 + 4 * 10, "int32 indices beat a 125-byte mask"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"density": 0.0}, r"density must be a number in \(0, 1\], got 0.0"),
        ({"density": 1.5}, "density must be"),
        ({"density": "0.1"}, "density must be"),
        ({"density": 0.001}, "density 0.001 keeps none of the 75 weights"),
        ({"removal": "snr"}, r"removal 'snr' is unknown; use one of \('abs_mean', 'snr_abs', 'mean_abs'\)"),
        ({"addition": "magnitude"}, "addition 'magnitude' is unknown; use one of"),
        ({"added_scale": "zero"}, "added_scale 'zero' is unknown"),
        ({"update_every": 0}, "update_every must be an integer >= 1, got 0"),
        ({"update_every": 2.5}, "update_every must be an integer"),
        ({"total_steps": True}, "total_steps must be an integer"),
        ({"seed": -1}, "seed must be an integer >= 0"),
        ({"replacement_rate": 1.2}, r"replacement_rate must be a number in \[0, 1\], got 1.2"),
        ({"dense_sites": ["fc.weight"]}, r"dense_sites \['fc.weight'\] are not Bayesian sites"),
        ({"density": 0.05, "dense_sites": ["0.weight"]}, "keeps 4 weights, fewer than the 40 of dense_sites"),
        ({"init_scale": -1.0}, "init_scale must be > 0"),
    ],
)
def test_bad_arguments_raise_one_line_value_errors(kwargs, message):
    kwargs = {"density": 0.3, **kwargs}
    bnn = BayesianNetwork(mlp(), IIDNormalPrior(), Categorical(1))
    with pytest.raises(ValueError, match=message):
        SparseSubspaceGuide(bnn, **kwargs)


def test_a_non_normal_prior_is_rejected_by_name():
    bnn = BayesianNetwork(mlp(), ScaleMixturePrior(), Categorical(1))
    with pytest.raises(ValueError, match="needs a Normal prior per weight; site '0.weight' has"):
        SparseSubspaceGuide(bnn, 0.3)
