"""benchmarks/reproduce.py end to end on a tiny budget (fake CIFAR-10 and MNIST), so the script cannot rot."""

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import write_fake_cifar10c, write_fake_svhn
from tests.test_data import write_cifar10_jpeg

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "reproduce.py"
TINY_BUDGET = [
    "deterministic.epochs=1", "deterministic.warmup_epochs=0", "mean_field.epochs=1", "mean_field.eval_samples=1",
    "fine_tune.eval_samples=1", "spike_slab.epochs=1", "spike_slab.eval_samples=1", "ssvi.epochs=1",
    "ssvi.eval_samples=1", "ssvi.kl_warmup_epochs=0", "data.batch_size=16", "data.eval_batch_size=32",
    "data.train_subset=32", "sharing.grad_batches=1", "sharing.num_components=8", "sharing.gmm_max_epochs=2",
    "sharing.min_cluster_size=5", "predict.num_samples=2", "int8.scale_bits=[8, 4]",
]


@pytest.mark.integration
def test_every_table_of_the_reproduction_runs_on_a_tiny_budget(fake_mnist, tmp_path):
    write_cifar10_jpeg(fake_mnist, per_class=2)
    write_fake_svhn(fake_mnist, n=12)
    write_fake_cifar10c(fake_mnist, per_severity=6)
    spec = importlib.util.spec_from_file_location("reproduce", SCRIPT)
    reproduce = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reproduce)
    common = ["--data-dir", str(fake_mnist), "--out", str(tmp_path / "runs"), "--shift-examples", "12", "--samples", "2",
              *[x for item in TINY_BUDGET for x in ("--set", item)]]
    results = {}
    for table in ("cifar10", "ablations", "shift", "mnist"):
        reproduce.main([table, *common, "--results", str(tmp_path / f"{table}.json")])
        results[table] = json.loads((tmp_path / f"{table}.json").read_text())
        assert results[table]["command"].startswith(f"python benchmarks/reproduce.py {table}")

    rows = results["cifar10"]["result"]["rows"]
    assert list(rows) == ["deterministic", "mean-field", "mean-field, local reparam.", "2dgbnn", "int8", "spike-slab", "ssvi"]
    assert rows["2dgbnn"]["n_params_trainable"] < rows["mean-field"]["n_params_trainable"]
    assert rows["ssvi"]["kl_scale"] == 0.01 and rows["mean-field"]["kl_scale"] == 1.0, "tempering is stated per row"
    assert rows["mean-field"]["prior"] == "iid_normal(loc=0.0, scale=0.1)" and "prior" not in rows["deterministic"]
    assert rows["mean-field"]["batchnorm"] == "per_draw"
    lrt = yaml.safe_load((tmp_path / "runs" / "cifar10" / "mean-field-lrt" / "config.yaml").read_text())
    assert lrt["method"] == "mean-field" and lrt["bnn"]["estimator"] == "local"
    lrt_metrics = json.loads((tmp_path / "runs" / "cifar10" / "mean-field-lrt" / "metrics.json").read_text())
    base_metrics = json.loads((tmp_path / "runs" / "cifar10" / "2dgbnn" / "metrics.json").read_text())
    assert lrt_metrics["stages"]["deterministic"] == base_metrics["stages"]["deterministic"], "one shared stage 0"
    for row, run in (("2dgbnn", base_metrics), ("mean-field, local reparam.", lrt_metrics)):
        assert (rows[row]["accuracy"], rows[row]["nll"]) == (run["accuracy"], run["nll"]), f"{row}: the run's own numbers"

    ablations = results["ablations"]["result"]
    assert ablations["table5_outliers_ellipses"]["no outliers"]["sharing"]["n_outliers"] == 0
    assert ablations["table5_outliers_ellipses"]["no ellipses"]["sharing"]["n_ellipses"] == 0
    assert set(ablations["table8_tau_w"]) == {"tau_w=0.2", "tau_w=0.1", "tau_w=0.4", "tau_w=0.6"}
    assert set(ablations["semantics"]) == {"tied", "hierarchical", "independent"}
    tau = {label: r["sharing"]["n_outliers"] for label, r in ablations["table8_tau_w"].items()}
    assert tau["tau_w=0.1"] >= tau["tau_w=0.2"] >= tau["tau_w=0.4"] >= tau["tau_w=0.6"]  # a higher threshold keeps fewer

    shift = results["shift"]["result"]["models"]
    assert set(shift) == set(rows)
    assert results["shift"]["result"]["corruptions"] == "CIFAR-10-C"
    assert results["shift"]["result"]["ood_examples"] == {"mnist": 12, "svhn": 12}
    for name, model in shift.items():
        assert set(model["corrupted_mean_by_severity"]) == {"1", "3", "5"}
        for ood in ("ood_mnist", "ood_svhn"):
            assert ("mi_auroc" in model[ood]) == (name != "deterministic")
        assert sum(model["clean_calibration_bins"]["count"]) == results["shift"]["result"]["examples"]

    document = tmp_path / "results.md"
    document.write_text("".join(f"## {t}\n<!-- table:{t} -->\nstale\n<!-- /table:{t} -->\n" for t in results))
    folder = tmp_path / "json"
    folder.mkdir()
    for table in results:
        (folder / f"reproduce-{table}.json").write_text((tmp_path / f"{table}.json").read_text())
    reproduce.main(["report", "--results", str(folder), "--document", str(document)])
    text = document.read_text()
    assert "stale" not in text and text.count("| 2dgbnn |") == 4  # the cifar10 and shift rows, and one per MNIST network
    assert "| no outliers | " in text and "| int8, 4-bit std |" in text and "SVHN AUROC entropy / MI" in text
    for figure in ("cifar10_accuracy_vs_parameters", "cifar10_shift_accuracy", "cifar10_reliability"):
        assert (tmp_path / "figures" / f"{figure}.png").stat().st_size > 1000

    mnist = results["mnist"]["result"]
    assert set(mnist) == {"lenet", "resnet20"} and all(set(t) == {"deterministic", "mean-field", "2dgbnn"} for t in mnist.values())
