"""Data-parallel runs on PyTorch's own engine: ``torchrun`` starts the processes,
``torch.distributed`` connects them (gloo on CPUs, NCCL on GPUs), and
``DistributedDataParallel`` all-reduces the gradients.

Everything here is a no-op in a single process, so the pipeline calls these functions
unconditionally and a plain ``python -m pyro_gbnn.fit`` never touches ``torch.distributed``.
A run is data-parallel when torchrun's ``WORLD_SIZE`` is above 1; rank 0 writes every
file, all ranks compute.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from pyro_gbnn.devices import resolve_device
from pyro_gbnn.errors import UsageError

__all__ = [
    "setup",
    "teardown",
    "is_distributed",
    "rank",
    "world_size",
    "is_main",
    "barrier",
    "all_sum",
    "broadcast_object",
    "all_gather_objects",
    "shard_range",
    "data_parallel",
    "main_first",
    "rank_seed",
    "rng_states",
    "set_rng_states",
    "check_saved_world",
]

T = TypeVar("T")


def setup(device: str | torch.device = "auto") -> bool:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1); True if this call joined it.

    gloo for CPU runs, NCCL for a CUDA device (``auto`` on a GPU machine, ``cuda``: each
    process then uses GPU ``LOCAL_RANK``, see :func:`~pyro_gbnn.devices.resolve_device`).
    """
    if dist.is_available() and dist.is_initialized():
        return False
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    missing = [key for key in ("RANK", "MASTER_ADDR", "MASTER_PORT") if key not in os.environ]
    if missing:
        raise UsageError(f"WORLD_SIZE is set but {', '.join(missing)} are not; start data-parallel runs with torchrun")
    device = resolve_device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def teardown(joined: bool) -> None:
    """Leave the process group if :func:`setup` joined it."""
    if joined and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Whether this process writes files and prints (rank 0, or the only process)."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block before the others do (e.g. to write a cache they then read)."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over ranks, in place (and returned); unchanged in one process.
    NCCL reduces GPU tensors only, so a CPU tensor goes through this rank's GPU there."""
    if not is_distributed():
        return tensor
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        staged = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(staged, op=dist.ReduceOp.SUM)
        return tensor.copy_(staged)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(value: T, src: int = 0) -> T:
    """Rank ``src``'s ``value`` on every rank (any picklable object)."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank."""
    if not is_distributed():
        return [value]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


def shard_range(n: int) -> tuple[int, int]:
    """This rank's contiguous share [start, stop) of ``n`` items (sizes differ by at most one)."""
    size, r = world_size(), rank()
    return r * n // size, (r + 1) * n // size


class _StepModule(nn.Module):
    """Makes a training step the ``forward`` of a module that owns the trained parameters,
    so ``DistributedDataParallel`` sees the forward pass it synchronises."""

    def __init__(self, trained: nn.Module, step) -> None:
        super().__init__()
        self.trained = trained
        self.step = step

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        return self.step(x, y)


def data_parallel(trained: nn.Module, step):
    """``step`` (``(x, y) -> StepResult``, using ``trained``'s parameters) with gradients
    averaged over ranks by ``DistributedDataParallel``; ``step`` itself in one process.

    The per-rank loss is the local mini-batch's estimate (the ELBO's likelihood scaled by
    N / local batch), so the average DDP takes is the estimate of the global batch.
    Every trained parameter must take part in each step (DDP's default); rank 0's
    parameters and buffers are copied to every rank when the wrapper is built, and its
    buffers (BatchNorm statistics) before every step.
    """
    if not is_distributed() or not any(p.requires_grad for p in trained.parameters()):
        return step
    device = next(trained.parameters()).device
    return nn.parallel.DistributedDataParallel(
        _StepModule(trained, step),
        device_ids=[device.index] if device.type == "cuda" else None,
    )


def rank_seed(seed: int) -> int:
    """The seed of this rank's random stream: the run's seed on rank 0, derived from it on the
    others, so a run is reproducible for a fixed number of processes."""
    return seed + 1_000_003 * rank()


def rng_states() -> dict[str, Any]:
    """Every random-number state a training step reads (:func:`~pyro_gbnn.checkpoint.rng_state`),
    of every rank (``{"ranks": [...]}``) in a data-parallel run; all ranks must call it."""
    from pyro_gbnn.checkpoint import rng_state

    if not is_distributed():
        return rng_state()
    return {"ranks": all_gather_objects(rng_state())}


def check_saved_world(state: dict[str, Any]) -> None:
    """A one-line error when random states from :func:`rng_states` were saved by another
    number of processes than this run has (its data shards and streams would differ)."""
    saved = len(state["ranks"]) if "ranks" in state else 1
    if saved != world_size():
        raise UsageError(
            f"this run was saved by {saved} process(es) and is resumed by {world_size()}; resume it with "
            f"{'torchrun --nproc_per_node ' + str(saved) if saved > 1 else 'a single process (no torchrun)'}"
        )


def set_rng_states(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_states` returned, each rank its own."""
    from pyro_gbnn.checkpoint import set_rng_state

    check_saved_world(state)
    set_rng_state(state["ranks"][rank()] if "ranks" in state else state)
