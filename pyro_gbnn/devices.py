"""Which device a run computes on, chosen once and then followed by every tensor.

``device: auto`` (the default) is the GPU when torch sees one, under ``torchrun`` the
local rank's GPU, and the CPU otherwise; ``cuda``, ``cuda:N``, ``mps`` and ``cpu`` ask for
one explicitly, and an explicit device this machine lacks is a one-line error before any
data is read. The library builds every tensor on the device of the tensors it is made
from, so moving the network is all a user does by hand.
"""

from __future__ import annotations

import os

import torch

from pyro_gbnn.errors import UsageError

__all__ = ["DEVICE_CHOICES", "resolve_device", "describe_device"]

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """The torch device that ``name`` means on this machine (and, under torchrun, this rank).

    ``auto``/None: ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU. ``cuda`` without
    an index is the local rank's GPU, so one config serves every process of a torchrun job.
    """
    if name is None or name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", _local_rank() % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UsageError(f"device {name!r} is not a torch device; use {DEVICE_CHOICES}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(
                f"device {name!r} is not available on this machine (torch sees no CUDA GPU); choose device auto or cpu"
            )
        index = _local_rank() if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise UsageError(
                f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
        return torch.device("cuda", index)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"device {name!r} is not available on this machine; choose device auto or cpu")
    return device


def describe_device(device: torch.device) -> str:
    """One phrase for the first output line: ``cuda:0 (NVIDIA H200)`` or ``cpu (2 threads)``."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return str(device)
