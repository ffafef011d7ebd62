"""Checkpoints written atomically and read back safely.

A checkpoint is a plain dict of tensors, numbers and strings, so it loads with
``torch.load(weights_only=True)``: no pickled code runs when a file is opened.
"""

from __future__ import annotations

import copy
import os
import random
import tempfile
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from pyro_gbnn.errors import UsageError
from pyro_gbnn.version import __version__

__all__ = ["atomic_write_bytes", "save_checkpoint", "load_checkpoint", "rng_state", "set_rng_state"]

FORMAT = "pyro_gbnn.checkpoint/2"
"""The layout this version writes and reads; another is a one-line error naming the version
that wrote it (2: 0.2.0, every key of a run's checkpoint always present; 1: 0.1.x)."""


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, write) -> None:
    """Call ``write(file)`` on a temp file beside ``path``, fsync it, then rename over ``path``.

    A reader (or a crash) sees either the old file or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; run files read like any other
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _on_cpu(value: Any, memo: dict[int, torch.Tensor]) -> Any:
    """``value`` with every tensor in its dicts, lists and tuples on the CPU (CPU tensors as
    they are; a tensor met twice stays one tensor). A ``state_dict``'s ``_metadata`` is kept."""
    if isinstance(value, torch.Tensor):
        if value.device.type == "cpu":
            return value
        if id(value) not in memo:
            memo[id(value)] = value.detach().cpu()
        return memo[id(value)]
    if isinstance(value, dict):
        moved = copy.copy(value)  # its type and attributes, e.g. an OrderedDict's _metadata
        for key, item in value.items():
            moved[key] = _on_cpu(item, memo)
        return moved
    if isinstance(value, (list, tuple)):
        items = [_on_cpu(item, memo) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    return value


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` (tensors on any device are written as CPU tensors, so the file loads on
    any machine, even with a plain ``torch.load(path, weights_only=True)``)."""
    state = _on_cpu({"format": FORMAT, "written_by": __version__, **state}, {})
    atomic_write_bytes(path, lambda handle: torch.save(state, handle))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint; a missing, truncated or foreign file is a :class:`UsageError`."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint {str(path)!r} does not exist; check --out or start without --resume")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for damaged files
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(
            f"checkpoint {str(path)!r} is corrupt or not a pyro_gbnn checkpoint ({reason[:120]}); "
            "move it away and rerun, or start a new run with another --out"
        ) from None
    found = state.get("format") if isinstance(state, dict) else None
    if isinstance(found, str) and found.startswith("pyro_gbnn.checkpoint/") and found != FORMAT:
        writer = state.get("written_by", "0.1.x")
        raise UsageError(
            f"checkpoint {str(path)!r} was written by pyro_gbnn {writer} (format {found}); pyro_gbnn {__version__} "
            f"reads {FORMAT}: open it with pyro_gbnn {writer}, or start the run again"
        )
    if found != FORMAT:
        raise UsageError(f"checkpoint {str(path)!r} is not a pyro_gbnn checkpoint (expected format {FORMAT})")
    return state


def rng_state() -> dict[str, Any]:
    """Every random-number state a training step reads, in a weights_only-safe form: torch's
    CPU generator, NumPy's, Python's and, when this process has used CUDA, every CUDA
    device's generator (``"cuda"``: a list of uint8 tensors, one per visible device)."""
    np_state = cast(tuple, np.random.get_state(legacy=True))  # ("MT19937", keys, pos, has_gauss, cached)
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": list(random.getstate()[1]) + [random.getstate()[0], random.getstate()[2]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # reading them would start CUDA otherwise
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned. CUDA states are restored where this machine
    has CUDA (as many devices as both have); without CUDA they are ignored, so a run saved on
    a GPU resumes on the CPU (with other random draws from then on). A state saved without
    CUDA leaves the CUDA generators as they are."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np_state[1].numpy().astype(np.uint32), *np_state[2:]))
    python = state["python"]
    random.setstate((python[-2], tuple(python[:-2]), python[-1]))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu().to(torch.uint8) for s in cuda[: torch.cuda.device_count()]])
