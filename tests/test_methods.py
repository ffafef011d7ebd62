"""The compression methods beside 2DGBNN through run_fit and the command line: spike-and-slab,
SSVI and INT8 write the same metrics.json fields, their sizes add up, and runs resume exactly."""

import json

import pytest
import torch

from pyro_gbnn import pipeline
from pyro_gbnn.elbo import AnalyticKL_ELBO
from pyro_gbnn.errors import UsageError
from pyro_gbnn.fit import main
from pyro_gbnn.train import elbo_step
from tests.conftest import INT8, SPIKE_SLAB, SSVI, kill_then_resume, tiny_config


def test_spike_slab_reports_sparsity_before_and_after_pruning(fake_mnist, tmp_path):
    metrics = pipeline.run_fit(tiny_config(fake_mnist, "spike-slab", SPIKE_SLAB), tmp_path / "run")
    stages = metrics["stages"]
    assert list(stages) == ["deterministic", "spike_slab", "prune"]
    unpruned, pruned = stages["spike_slab"], stages["prune"]
    for result in (unpruned, pruned):
        assert {"accuracy", "nll", "ece", "sparsity", "n_params_trainable", "size_bytes"} <= set(result)
    n_weights = stages["deterministic"]["n_params_trainable"]  # the MLP has no normalisation layers
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["outputs"]["spike_slab"]["elbo"]
    logits = [value for key, value in saved.items() if ".inclusion_logit." in key]
    kept = sum(int((torch.sigmoid(logit) > 0.5).sum()) for logit in logits)  # prune_threshold 0.5
    assert sum(logit.numel() for logit in logits) == n_weights and 0 < kept < n_weights
    assert unpruned["sparsity"] == pruned["sparsity"] == pytest.approx(1 - kept / n_weights), "the pruned mask's sparsity"
    assert pruned["n_kept"] == round((1 - pruned["sparsity"]) * n_weights)
    assert pruned["n_params_trainable"] == 2 * pruned["n_kept"]
    assert pruned["size_bytes"] < unpruned["size_bytes"] or pruned["sparsity"] == 0
    assert metrics["accuracy"] == pruned["accuracy"] and metrics["sparsity"] == pruned["sparsity"]


def test_pruned_posterior_fine_tunes_its_kept_weights_only(fake_mnist, tmp_path):
    config = tiny_config(fake_mnist, "spike-slab", SPIKE_SLAB + ["prune.epochs=1", "prune.lr=0.01"])
    metrics = pipeline.run_fit(config, tmp_path / "run")
    pruned = metrics["stages"]["prune"]
    assert pruned["epochs"] == 1 and pruned["sparsity"] == metrics["stages"]["spike_slab"]["sparsity"]
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["outputs"]
    before, after = state["spike_slab"]["elbo"], state["prune"]["elbo"]
    masks = {key: mask for key, mask in after.items() if ".mask." in key}
    assert masks and all(mask.dtype == torch.bool for mask in masks.values())
    for key, mask in masks.items():
        loc = after[key.replace(".mask.", ".loc.")]
        assert not loc[~mask].any()  # pruned weights stay exactly zero
        trained = before[key.replace(".mask.", ".loc.")][mask]
        assert not torch.equal(loc[mask], trained)  # kept weights moved


def test_ssvi_keeps_its_density_and_reports_training_flops(fake_mnist, tmp_path):
    metrics = pipeline.run_fit(tiny_config(fake_mnist, "ssvi", SSVI), tmp_path / "run")
    assert list(metrics["stages"]) == ["ssvi"]
    assert metrics["density"] == pytest.approx(0.2, abs=1e-3)
    assert metrics["train_macs_ratio"] == pytest.approx(0.2, abs=0.02)
    assert metrics["accuracy"] > 0.2
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["train_kl_weight"] < 1 for r in log if "epoch" in r] == [True, False]


def test_int8_reports_one_row_per_scale_bit_width(fake_mnist, tmp_path):
    metrics = pipeline.run_fit(tiny_config(fake_mnist, "int8", INT8), tmp_path / "run")
    quantized = metrics["stages"]["quantize"]
    rows = quantized["by_scale_bits"]
    assert list(rows) == ["8", "4", "2", "1"]
    sizes = [rows[b]["size_bytes"] for b in rows]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 4
    n_weights = metrics["stages"]["deterministic"]["n_params_trainable"]
    assert sizes[0] < 4 * 2 * n_weights / 3, "8-bit means and scales take about a quarter of fp32"
    assert metrics["scale_bits"] == 8 and metrics["size_bytes"] == sizes[0]
    assert metrics["n_params_trainable"] == metrics["stages"]["mean_field"]["n_params_trainable"]
    for row in rows.values():
        assert row["accuracy"] > 0.3


@pytest.mark.parametrize("method, extra, kill_after", [
    ("spike-slab", SPIKE_SLAB, 4), ("spike-slab", SPIKE_SLAB + ["prune.epochs=2"], 7), ("ssvi", SSVI, 1),
])
def test_new_methods_resume_exactly(fake_mnist, tmp_path, monkeypatch, method, extra, kill_after):
    config = tiny_config(fake_mnist, method, extra)
    reference = pipeline.run_fit(config, tmp_path / "reference")
    resumed = kill_then_resume(config, tmp_path / "killed", monkeypatch, kill_after)
    for stage, result in reference["stages"].items():
        for key, value in result.items():
            if key != "wall_time_s":
                assert resumed["stages"][stage][key] == value, (stage, key)


@pytest.mark.parametrize("method, extra, column", [("spike-slab", SPIKE_SLAB, "sparsity"), ("int8", INT8, "1-bit sd")])
def test_cli_runs_each_method(fake_mnist, tmp_path, capsys, method, extra, column):
    overrides = [arg for item in extra for arg in ("--set", item)]
    code = main(["--dataset", "mnist", "--model", "mlp", "--method", method, "--data-dir", str(fake_mnist),
                 "--out", str(tmp_path / method), "--no-progress", "--set", "deterministic.epochs=1",
                 "--set", "predict.num_samples=2", *overrides])
    assert code == 0
    printed = capsys.readouterr().out
    assert column in printed
    assert json.loads((tmp_path / method / "metrics.json").read_text())["method"] == method


def test_kl_scale_tempers_the_kl_after_warm_up(fake_mnist, tmp_path):
    tempered = SSVI[:-1] + ["ssvi.kl_warmup_epochs=1", "ssvi.kl_scale=0.01"]
    pipeline.run_fit(tiny_config(fake_mnist, "ssvi", tempered), tmp_path / "run")
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    weights = [r["train_kl_weight"] for r in log if "epoch" in r]
    assert weights[0] < 0.01 and weights[1] == pytest.approx(0.01)


def test_kl_scale_must_be_positive(fake_mnist, tmp_path):
    with pytest.raises(UsageError, match=r"ssvi.kl_scale must be a number > 0"):
        pipeline.run_fit(tiny_config(fake_mnist, "ssvi", SSVI + ["ssvi.kl_scale=0"]), tmp_path / "run")


def test_kl_warm_up_scales_only_the_kl_term():
    import pyro_gbnn as pg

    bnn = pg.BayesianNetwork(torch.nn.Linear(3, 2), pg.IIDNormalPrior(0.0, 1.0), pg.Categorical(100))
    guide = pg.MeanFieldGuide(bnn, init_scale=0.1)
    elbo = AnalyticKL_ELBO(bnn, guide)
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    torch.manual_seed(0)
    full = elbo_step(elbo, 100)(x, y)
    torch.manual_seed(0)
    half = elbo_step(elbo, 100, kl_weight=lambda: 0.5)(x, y)
    assert half.extra["kl_weight"] == 0.5
    expected = full.loss.item() - 0.5 * float(full.extra["kl"])
    assert half.loss.item() == pytest.approx(expected, rel=1e-6)
