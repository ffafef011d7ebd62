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


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory):
    """A tiny mean-field ResNet-20 run (BatchNorm) at the shipped defaults: per-draw statistics,
    three evaluation seeds."""
    from pyro_gbnn import pipeline
    from tests.conftest import tiny_config, write_fake_mnist

    root = tmp_path_factory.mktemp("resnet")
    extra = ["model=resnet20", "deterministic.epochs=1", "mean_field.epochs=1", "mean_field.eval_samples=1",
             "predict.num_samples=2", "predict.batchnorm_batches=2"]
    metrics = pipeline.run_fit(tiny_config(write_fake_mnist(root / "data"), "mean-field", extra), root / "run")
    return root / "run", metrics


def test_per_draw_statistics_and_three_evaluation_seeds_are_the_defaults():
    from pyro_gbnn.config import DEFAULTS

    assert DEFAULTS["predict"]["batchnorm"] == "per_draw" and DEFAULTS["predict"]["evaluation_seeds"] == 3


def test_a_run_evaluates_with_per_draw_statistics_and_reports_its_spread_over_seeds(resnet_run):
    """On a ResNet (BatchNorm) the stage's metrics are the mean of three seeds with their
    range, each seed's evaluation differs, the mode changes the numbers, a reopened run
    scores the same, and the model's size counts each draw's statistics."""
    from pyro_gbnn import pipeline
    from pyro_gbnn.batchnorm import per_draw_batchnorm_bytes
    from pyro_gbnn.metrics import mean_and_spread

    folder, metrics = resnet_run
    assert "spread" not in metrics["stages"]["deterministic"], "a deterministic network is evaluated once"
    stage = metrics["stages"]["mean_field"]
    assert stage["spread"]["seeds"] == 3 and stage["batchnorm"] == "per_draw"

    run, bnn, guide = pipeline.load_run_model(folder, stage="mean_field")
    n_weights = sum(s.numel() for s in bnn.site_shapes.values())
    assert stage["n_params_trainable"] == 2 * n_weights + count_deterministic(bnn)
    assert stage["size_bytes"] == 4 * stage["n_params_trainable"] + per_draw_batchnorm_bytes(bnn, 2)
    per_seed = [run.evaluate(bnn, guide, "test", 2, repeat) for repeat in range(3)]
    assert mean_and_spread(per_seed) == {k: v for k, v in stage.items() if k in per_seed[0] or k == "spread"}
    assert len({row["nll"] for row in per_seed}) == 3, "each seed draws other weights"
    run.config["predict"]["batchnorm"] = "running"
    assert run.evaluate(bnn, guide, "test", 2, 0)["nll"] != per_seed[0]["nll"]


def count_deterministic(bnn: nn.Module) -> int:
    """Trainable values of the network that are not Bayesian weights (BatchNorm's affine)."""
    return sum(p.numel() for p in bnn.parameters() if p.requires_grad)


def test_a_model_file_stores_each_draws_statistics_and_predicts_as_the_run(resnet_run, tmp_path, monkeypatch):
    """The file holds S draws' BatchNorm statistics (counted as the run counts them) and
    predicts exactly as the run's first evaluation seed; asking for more draws than stored is
    a one-line error; a file of a run scored with running statistics holds none."""
    from pyro_gbnn import pipeline
    from pyro_gbnn.batchnorm import per_draw_batchnorm_bytes
    from pyro_gbnn.errors import UsageError
    from pyro_gbnn.model_file import export_model, load_model

    folder, _ = resnet_run
    run, bnn, guide = pipeline.load_run_model(folder, stage="mean_field")
    sizes = export_model(folder, tmp_path / "m.safetensors", device="cpu")
    assert sizes["batchnorm"] == per_draw_batchnorm_bytes(bnn, 2)
    loaded = load_model(tmp_path / "m.safetensors", device="cpu")
    x = torch.stack([run.data.test[i][0] for i in range(10)])
    y = torch.tensor([run.data.test[i][1] for i in range(10)])
    expected = predict(bnn, guide, [(x, y)], draws=run.fixed_draws(bnn, guide, 2), keep_samples=True)
    summary = loaded.predict(x)
    assert torch.allclose(summary.probs, expected.probs, atol=1e-6)
    assert torch.allclose(loaded.predict(x, 1).probs, expected.sample_probs[0], atol=1e-6), "the first stored draw"
    with pytest.raises(UsageError, match="BatchNorm statistics for 2 posterior draws"):
        loaded.predict(x, 3)

    opened = pipeline.open_run

    def scored_with_running_statistics(*args, **kwargs):
        run = opened(*args, **kwargs)
        run.config["predict"]["batchnorm"] = "running"
        return run

    monkeypatch.setattr(pipeline, "open_run", scored_with_running_statistics)
    assert export_model(folder, tmp_path / "r.safetensors", device="cpu")["batchnorm"] == 0
    assert load_model(tmp_path / "r.safetensors", device="cpu").draws is None

def test_arviz_log_likelihood_uses_each_draws_statistics():
    """PSIS-LOO's pointwise log-likelihood under ``batchnorm_batches``: each draw with its own
    statistics, as a plain network with those weights and statistics computes it."""
    net, bnn, guide = _bnn_and_guide()
    test = _batches(n=1, seed=9)[0]
    idata = pg.to_inference_data(guide, num_samples=3, bnn=bnn, data=test, batchnorm_batches=_batches(), seed=4)
    torch.manual_seed(4)
    weights = guide.sample_weights(3)
    for s in range(3):
        draw = {k: v[s] for k, v in weights.items()}
        plain = _plain_network_with(net, draw)
        statistics = batchnorm_statistics(bnn, draw, _batches())
        plain.load_state_dict({**plain.state_dict(), **{k.removeprefix("net."): v for k, v in statistics.items()}})
        expected = plain.eval()(test[0]).log_softmax(-1).gather(1, test[1].view(-1, 1)).squeeze(1)
        assert torch.allclose(torch.from_numpy(idata.log_likelihood["y"].values[0, s]).float(), expected, atol=1e-5), s
    running = pg.to_inference_data(guide, num_samples=3, bnn=bnn, data=test, seed=4)
    assert not torch.allclose(torch.from_numpy(running.log_likelihood["y"].values), torch.from_numpy(idata.log_likelihood["y"].values))


@pytest.mark.integration  # ResNet diagnostics draw 100 weights for k-hat and PSIS: minutes on 2 cores
def test_diagnose_predicts_with_each_draws_statistics(resnet_run):
    from pyro_gbnn.diagnose import diagnose_run

    folder, _ = resnet_run
    written = diagnose_run(folder, samples=2, device="cpu")
    summary = next(p for p in written if p.name == "summary.md").read_text()
    assert "each with its own BatchNorm statistics" in summary


def test_the_side_by_side_benchmark_scores_both_modes_over_seeds(resnet_run, tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "batchnorm_per_draw.py"
    spec = importlib.util.spec_from_file_location("batchnorm_per_draw", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    folder, metrics = resnet_run
    module.main([str(folder), "--stages", "mean_field", "--seeds", "2", "--out", str(tmp_path / "r.json")])
    result = json.loads((tmp_path / "r.json").read_text())["stages"]["mean_field"]
    assert set(result) == {"recorded", "running", "per_draw"}
    assert result["recorded"]["nll"] == metrics["stages"]["mean_field"]["nll"]
    for mode in ("running", "per_draw"):
        assert len(result[mode]["per_seed"]) == 2
        low, high = result[mode]["range"]["nll"]
        assert low <= result[mode]["nll"] <= high and low < high
    low, high = metrics["stages"]["mean_field"]["spread"]["nll"]  # the run's seeds 0-2 include the benchmark's 0-1
    assert all(low <= row["nll"] <= high for row in result["per_draw"]["per_seed"])
