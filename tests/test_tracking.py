"""--tracker: the records of log.jsonl, the stage table and the diagnostic pictures reach
TensorBoard event files and an MLflow run; a resumed run logs to the same MLflow run."""

import json

import pytest

from pyro_gbnn import pipeline
from pyro_gbnn.diagnose import diagnose_run
from pyro_gbnn.errors import UsageError
from pyro_gbnn.tracking import scalars
from tests.conftest import tiny_config


def epoch_records(out):
    return [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "epoch" in r]


def test_scalars_flatten_the_numbers_of_a_record():
    record = {"stage": "s", "epoch": 2, "loss": 1.5, "eval": {"accuracy": 0.5, "n": 3}, "finished": True, "bits": [8, 4]}
    assert scalars(record) == {"loss": 1.5, "eval_accuracy": 0.5, "eval_n": 3.0}


def test_tensorboard_gets_every_epoch_record_the_table_and_the_pictures(fake_mnist, tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    out = tmp_path / "run"
    pipeline.run_fit(tiny_config(fake_mnist, "mean-field", ["tracker=tensorboard", "mean_field.epochs=2"]), out)
    diagnose_run(out, samples=2)
    events = event_accumulator.EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    records = [r for r in epoch_records(out) if r["stage"] == "mean_field"]
    loss = events.Scalars("mean_field/loss")
    assert [e.step for e in loss] == [r["epoch"] for r in records]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in records])
    assert "mean_field/eval_accuracy" in tags["scalars"] and "mean_field/test_accuracy" in tags["scalars"]
    assert {"diagnostics/reliability", "diagnostics/training_curves"} <= set(tags["images"])
    assert any(tag.startswith("stage_table") for tag in tags["tensors"])


def test_mlflow_gets_params_metrics_and_artifacts_and_a_resume_continues_its_run(fake_mnist, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")  # a lab server in real use
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root is ./mlruns
    out = tmp_path / "run"
    config = tiny_config(fake_mnist, "mean-field", ["tracker=mlflow", "mean_field.epochs=2"])
    from tests.conftest import kill_then_resume

    kill_then_resume(config, out, monkeypatch, 2)  # dies after stage 0's checkpoint, resumes
    run_id = (out / "mlflow_run_id").read_text().strip()
    client = mlflow.tracking.MlflowClient()
    assert len(client.search_runs([client.get_run(run_id).info.experiment_id])) == 1, "the resume logged to the same run"
    run = client.get_run(run_id)
    assert run.data.params["method"] == "mean-field" and run.data.params["mean_field.epochs"] == "2"
    history = client.get_metric_history(run_id, "mean_field/loss")
    assert [m.step for m in history] == [1, 2]
    assert run.data.metrics["mean_field/test_accuracy"] == pytest.approx(json.loads((out / "metrics.json").read_text())["accuracy"])
    assert "stage_table.txt" in {a.path for a in client.list_artifacts(run_id)}


def test_an_unknown_tracker_is_refused_before_work(fake_mnist, tmp_path):
    with pytest.raises(UsageError, match="unknown tracker 'wandb'; use one of none, tensorboard, mlflow"):
        pipeline.run_fit(tiny_config(fake_mnist, "mean-field", ["tracker=wandb"]), tmp_path / "run")
