"""BatchNorm statistics per posterior draw: the mechanics on a tiny BatchNorm network."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import pyro_gbnn as pg
from pyro_gbnn.batchnorm import batchnorm_statistics, current_batchnorm_statistics
from pyro_gbnn.predict import draw_weights, fixed_draws, predict


def _network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 6 * 6, 3),
    )


def _bnn_and_guide():
    net = _network()
    bnn = pg.BayesianNetwork(net, pg.IIDNormalPrior(0.0, 1.0), pg.Categorical(100))
    guide = pg.MeanFieldGuide(bnn, init_scale=0.3)  # broad: draws differ a lot, as BatchNorm sees them
    return net, bnn, guide


def _batches(n: int = 3, size: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 1, 6, 6, generator=g) * 2 + 1, torch.randint(0, 3, (size,), generator=g)) for _ in range(n)]


def _plain_network_with(net: nn.Module, weights: dict[str, torch.Tensor]) -> nn.Module:
    """A plain copy of ``net`` whose parameters are the drawn ``weights``."""
    plain = copy.deepcopy(net)
    with torch.no_grad():
        for name, param in plain.named_parameters():
            if name in weights:
                param.copy_(weights[name])
    return plain


def test_per_draw_statistics_are_those_of_a_train_mode_pass_with_that_draws_weights():
    net, bnn, guide = _bnn_and_guide()
    batches = _batches()
    torch.manual_seed(3)
    draw = {k: v[0] for k, v in draw_weights(bnn, guide, 1).items()}
    statistics = batchnorm_statistics(bnn, draw, batches)

    plain = _plain_network_with(net, draw)
    for m in plain.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    plain.train()
    with torch.no_grad():
        for x, _ in batches:
            plain(x)
    for layer in ("1", "4"):
        bn = plain.get_submodule(layer)
        assert torch.allclose(statistics[f"net.{layer}.running_mean"], bn.running_mean, atol=1e-6)
        assert torch.allclose(statistics[f"net.{layer}.running_var"], bn.running_var, atol=1e-6)
        assert int(statistics[f"net.{layer}.num_batches_tracked"]) == len(batches)
    # ...and they differ from the running statistics training left behind, which is the point
    assert not torch.allclose(statistics["net.1.running_var"], bnn.net.get_submodule("1").running_var, atol=1e-3)


def test_estimating_statistics_leaves_the_network_as_it_was():
    _, bnn, guide = _bnn_and_guide()
    bnn.train()
    before = current_batchnorm_statistics(bnn)
    momenta = [m.momentum for m in bnn.modules() if isinstance(m, nn.BatchNorm2d)]
    batchnorm_statistics(bnn, {k: v[0] for k, v in draw_weights(bnn, guide, 1).items()}, _batches())
    after = current_batchnorm_statistics(bnn)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert bnn.training and all(m.training for m in bnn.modules())
    assert [m.momentum for m in bnn.modules() if isinstance(m, nn.BatchNorm2d)] == momenta


def test_a_prediction_with_fixed_draws_uses_each_draw_with_its_own_statistics_for_every_batch():
    net, bnn, guide = _bnn_and_guide()
    draws = fixed_draws(bnn, guide, 3, _batches(), seed=5)
    test = _batches(n=2, seed=9)
    prediction = predict(bnn, guide, test, keep_samples=True, draws=draws)
    x = torch.cat([x for x, _ in test])
    for s in range(3):
        plain = _plain_network_with(net, {k: v[s] for k, v in draws.weights.items()})
        plain.load_state_dict({**plain.state_dict(), **{k.removeprefix("net."): v for k, v in draws.statistics[s].items()}})
        expected = plain.eval()(x).softmax(-1)
        assert torch.allclose(prediction.sample_probs[s], expected, atol=1e-5), s
    # the same draws for every batch: the second batch alone gets the same probabilities
    alone = predict(bnn, guide, test[1:], draws=draws)
    assert torch.allclose(alone.probs, prediction.probs[8:], atol=1e-6)
    # the network keeps its running statistics
    assert torch.equal(bnn.net.get_submodule("1").running_mean, net.get_submodule("1").running_mean)


def test_fixed_draws_are_a_function_of_their_seed_and_leave_the_global_stream_alone():
    _, bnn, guide = _bnn_and_guide()
    state = torch.get_rng_state()
    a = fixed_draws(bnn, guide, 2, _batches(), seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    b = fixed_draws(bnn, guide, 2, _batches(), seed=5)
    c = fixed_draws(bnn, guide, 2, _batches(), seed=6)
    name = next(iter(a.weights))
    assert torch.equal(a.weights[name], b.weights[name]) and not torch.equal(a.weights[name], c.weights[name])
    assert all(torch.equal(a.statistics[0][k], b.statistics[0][k]) for k in a.statistics[0])
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        fixed_draws(bnn, guide, 0, _batches())


def test_a_run_evaluates_with_per_draw_statistics_and_reports_its_spread_over_seeds(fake_mnist, tmp_path):
    """``predict.batchnorm: per_draw`` and ``predict.evaluation_seeds: 3`` on a ResNet (BatchNorm):
    the stage's metrics are the mean of three seeds with their range, each seed's evaluation
    differs, the mode changes the numbers, and a reopened run scores the same."""
    from pyro_gbnn import pipeline
    from pyro_gbnn.metrics import mean_and_spread
    from tests.test_fit import tiny_config

    extra = ["model=resnet20", "deterministic.epochs=1", "mean_field.epochs=1", "mean_field.eval_samples=1",
             "predict.num_samples=2", "predict.batchnorm=per_draw", "predict.batchnorm_batches=2", "predict.evaluation_seeds=3"]
    metrics = pipeline.run_fit(tiny_config(fake_mnist, "mean-field", extra), tmp_path / "run")
    assert "spread" not in metrics["stages"]["deterministic"], "a deterministic network is evaluated once"
    stage = metrics["stages"]["mean_field"]
    assert stage["spread"]["seeds"] == 3

    run, bnn, guide = pipeline.load_run_model(tmp_path / "run", stage="mean_field")
    per_seed = [run.evaluate(bnn, guide, "test", 2, repeat) for repeat in range(3)]
    assert mean_and_spread(per_seed) == {k: v for k, v in stage.items() if k in per_seed[0] or k == "spread"}
    assert len({row["nll"] for row in per_seed}) == 3, "each seed draws other weights"
    run.config["predict"]["batchnorm"] = "running"
    assert run.evaluate(bnn, guide, "test", 2, 0)["nll"] != per_seed[0]["nll"]
