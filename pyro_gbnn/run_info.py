"""Where and with what a run computed, for ``metrics.json``: a number is only comparable
with another when both say which device, how many processes, which precision and which
versions of torch, Pyro and this package (and its commit, in a source checkout)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import torch

from pyro_gbnn import distributed
from pyro_gbnn.devices import describe_device
from pyro_gbnn.version import __version__

__all__ = ["run_environment", "source_commit"]


def source_commit() -> str | None:
    """The git commit of the checkout this package is imported from ("+dirty" if it has
    uncommitted changes), or None when it is not a checkout (an installed wheel)."""
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def run_environment(device: torch.device, precision: str) -> dict[str, Any]:
    """The run's device (and its name), world size, precision and software versions."""
    import pyro

    return {
        "device": str(device),
        "device_name": describe_device(device),
        "world_size": distributed.world_size(),
        "precision": precision,
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "pyro": pyro.__version__,
        "pyro_gbnn": __version__,
        "commit": source_commit(),
    }
