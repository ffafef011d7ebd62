"""Experiment tracking beside ``log.jsonl``: TensorBoard event files or an MLflow run.

Every record a run writes to ``log.jsonl`` (per epoch: losses, ELBO terms, learning rate,
evaluation metrics; per finished stage: its test metrics, size and wall time) also goes to
the tracker as scalars named ``<stage>/<key>`` (nested keys joined by ``_``, epoch as the
step). At the end of a run the stage table is added as text; ``diagnose`` adds its
pictures. ``tensorboard`` writes event files into ``RUN_DIR/tensorboard``
(``tensorboard --logdir RUN_DIR``); ``mlflow`` logs to the tracking URI in the environment
(``MLFLOW_TRACKING_URI``: a lab's server; else MLflow's local default) and keeps the run id
in ``RUN_DIR/mlflow_run_id`` so a resumed run, and its diagnostics, log to the same run.
Both are optional extras: ``pip install -e ".[tracking]"``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pyro_gbnn.errors import UsageError

__all__ = ["TRACKERS", "Tracker", "open_tracker", "scalars"]

TRACKERS = ("none", "tensorboard", "mlflow")


def scalars(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of a (nested) record, keys joined by ``_``; strings, lists and flags left out."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out |= scalars(value, f"{prefix}{key}_")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("epoch", "step"):
            out[f"{prefix}{key}"] = float(value)
    return out


class Tracker:
    """No tracking (``tracker: none``): the interface the others fill in."""

    def record(self, record: dict[str, Any]) -> None:
        """One ``log.jsonl`` record."""

    def text(self, name: str, text: str) -> None:
        """A block of text (the stage table)."""

    def figure(self, name: str, path: Path) -> None:
        """A picture already written as PNG."""

    def close(self) -> None:
        """Flush and release."""


def _step_and_values(record: dict[str, Any]) -> tuple[str, int, dict[str, float]] | None:
    stage = record.get("stage")
    if stage is None:
        return None
    if "epoch" in record:
        return stage, int(record["epoch"]), scalars(record)
    if record.get("finished"):
        return stage, 0, scalars(record.get("test", {}), "test_")
    return None


class TensorBoardTracker(Tracker):
    def __init__(self, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def record(self, record: dict[str, Any]) -> None:
        found = _step_and_values(record)
        if found is not None:
            stage, step, values = found
            for key, value in values.items():
                self.writer.add_scalar(f"{stage}/{key}", value, step)

    def text(self, name: str, text: str) -> None:
        self.writer.add_text(name, "    " + text.replace("\n", "\n    "))  # markdown code block

    def figure(self, name: str, path: Path) -> None:
        import matplotlib.image

        self.writer.add_image(name, matplotlib.image.imread(str(path))[..., :3], dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class MLflowTracker(Tracker):
    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        import mlflow

        from pyro_gbnn.config import flatten

        self.mlflow = mlflow
        id_file = run_dir / "mlflow_run_id"
        if id_file.is_file():
            self.run = mlflow.start_run(run_id=id_file.read_text().strip())
        else:
            self.run = mlflow.start_run(run_name=run_dir.name)
            id_file.write_text(self.run.info.run_id)
            mlflow.log_params({key: str(value)[:500] for key, value in flatten(config).items()})

    def record(self, record: dict[str, Any]) -> None:
        found = _step_and_values(record)
        if found is not None:
            stage, step, values = found
            self.mlflow.log_metrics({f"{stage}/{key}": value for key, value in values.items()}, step=step)

    def text(self, name: str, text: str) -> None:
        self.mlflow.log_text(text, f"{name}.txt")

    def figure(self, name: str, path: Path) -> None:
        self.mlflow.log_artifact(str(path), "diagnostics")

    def close(self) -> None:
        self.mlflow.end_run()


def open_tracker(kind: str, run_dir: str | Path, config: dict[str, Any]) -> Tracker:
    """The tracker ``kind`` (one of :data:`TRACKERS`) of the run in ``run_dir``."""
    run_dir = Path(run_dir)
    if kind == "none":
        return Tracker()
    package = {"tensorboard": "tensorboard", "mlflow": "mlflow"}.get(kind)
    if package is None:
        raise UsageError(f"unknown tracker {kind!r}; use one of {', '.join(TRACKERS)}")
    try:
        __import__(package)
    except ImportError:
        raise UsageError(f'--tracker {kind} needs the {package} package: pip install -e ".[tracking]"') from None
    return TensorBoardTracker(run_dir) if kind == "tensorboard" else MLflowTracker(run_dir, config)
