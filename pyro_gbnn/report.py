"""A run's results as the paper's table: which final metrics a run reports and one row per stage."""

from __future__ import annotations

__all__ = ["FINAL_KEYS", "format_table"]

FINAL_KEYS = (
    "accuracy",
    "nll",
    "ece",
    "brier",
    "n_params_trainable",
    "size_bytes",
    "n_outliers",
    "n_ellipses",
    "n_gaussians",
    "n_params_paper",
    "size_bytes_values",
    "size_bytes_index",
    "sparsity",
    "density",
    "train_macs_ratio",
    "scale_bits",
)
"""The last stage's results that ``metrics.json`` repeats at its top level."""

_COLUMNS = (  # (metrics key, header, width, format)
    ("accuracy", "acc", 7, ".4f"),
    ("nll", "nll", 7, ".4f"),
    ("ece", "ece", 7, ".4f"),
    ("n_outliers", "outliers", 9, "d"),
    ("n_ellipses", "ellipses", 9, "d"),
    ("n_gaussians", "gaussians", 9, "d"),
    ("n_params_trainable", "params", 10, "d"),
    ("n_params_paper", "paper_params", 12, "d"),
    ("size_bytes", "bytes", 11, "d"),
    ("size_bytes_index", "of_index", 9, "d"),
    ("sparsity", "sparsity", 9, ".4f"),
    ("density", "density", 8, ".4f"),
    ("wall_time_s", "time_s", 8, ".1f"),
)


def _row(label: str, result: dict) -> str:
    cells = [
        f"{result[key]:>{width + 2}{fmt}}" if result.get(key) is not None else f"{'-':>{width + 2}}"
        for key, _, width, fmt in _COLUMNS
    ]
    return f"{label:<13}" + "".join(cells)


def format_table(metrics: dict) -> str:
    """One row per stage in the paper's table layout (accuracy, NLL, ECE, outliers,
    ellipses, Gaussians, parameters as we count them and as the paper does), plus the
    deployable bytes (and, for 2DGBNN, how many of them are the index), and wall time."""
    rows = [f"{'stage':<13}" + "".join(f"{header:>{width + 2}}" for _, header, width, _ in _COLUMNS)]
    for stage, result in metrics["stages"].items():
        rows.append(_row(stage, result))
        rows += [_row(f"  {bits}-bit sd", variant) for bits, variant in result.get("by_scale_bits", {}).items()]
    return "\n".join(rows)
