"""BatchNorm statistics per posterior draw (SWAG's ``bn_update``, Maddox et al. 2019).

A BatchNorm layer in eval mode normalises with running statistics gathered during
training, over many different weight draws. Under one particular draw the activations
have other means and variances, so the running statistics mis-normalise it: single draws
of a mean-field ResNet lose up to 20 points of accuracy, and which draws a prediction
happens to use moves its accuracy by points. Re-estimating the statistics for each draw,
on a few training batches with that draw's weights, normalises every draw as training
normalised a batch; a prediction then uses S fixed draws, each with its own statistics.
"""

from __future__ import annotations

from collections.abc import Iterable

import pyro
import torch
from pyro import poutine
from torch import nn

__all__ = [
    "BATCHNORM_MODES",
    "PER_DRAW_STATISTICS",
    "batchnorm_layers",
    "batchnorm_statistics",
    "current_batchnorm_statistics",
    "load_batchnorm_statistics",
    "per_draw_batchnorm_bytes",
]

BATCHNORM_MODES = ("running", "per_draw")

_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")
# What a prediction reads of each draw's statistics (and a model file stores, fp32).
PER_DRAW_STATISTICS = ("running_mean", "running_var")


def batchnorm_layers(module: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm layer of ``module`` that tracks running statistics, by name."""
    return {
        name: m
        for name, m in module.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    }


@torch.no_grad()
def batchnorm_statistics(
    bnn: nn.Module, weights: dict[str, torch.Tensor] | None, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """The running statistics of every BatchNorm layer of ``bnn`` re-estimated under one
    weight draw ``weights`` ({site: value}, None for a deterministic network): the exact
    average over ``batches`` of the batch statistics a train-mode pass computes
    (``momentum=None``), the rest of the network in eval mode. ``bnn`` is left as it was.

    Returns ``{"<layer>.running_mean": ..., "<layer>.running_var": ...,
    "<layer>.num_batches_tracked": ...}`` for :func:`load_batchnorm_statistics`.
    """
    layers = batchnorm_layers(bnn)
    saved = {
        name: (m.training, m.momentum, {k: getattr(m, k).clone() for k in _STATISTICS}) for name, m in layers.items()
    }
    device = next((p.device for p in bnn.parameters()), None)
    was_training = bnn.training
    bnn.eval()
    try:
        for m in layers.values():
            m.reset_running_stats()
            m.momentum = None  # cumulative average: every batch counts the same
            m.train()
        with poutine.condition(data=weights or {}), pyro.validation_enabled(False):
            for x, _ in batches:
                bnn(x if device is None else x.to(device, non_blocking=True))
        return current_batchnorm_statistics(bnn)
    finally:
        bnn.train(was_training)
        for name, m in layers.items():
            training, momentum, buffers = saved[name]
            m.train(training)
            m.momentum = momentum
            for k, value in buffers.items():
                getattr(m, k).copy_(value)


def current_batchnorm_statistics(bnn: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the statistics ``bnn``'s BatchNorm layers hold now (the format of
    :func:`batchnorm_statistics`)."""
    return {f"{name}.{k}": getattr(m, k).clone() for name, m in batchnorm_layers(bnn).items() for k in _STATISTICS}


@torch.no_grad()
def load_batchnorm_statistics(bnn: nn.Module, statistics: dict[str, torch.Tensor]) -> None:
    """Copy statistics from :func:`batchnorm_statistics` into ``bnn``'s BatchNorm layers."""
    for name, m in batchnorm_layers(bnn).items():
        for k in _STATISTICS:
            getattr(m, k).copy_(statistics[f"{name}.{k}"])


def per_draw_batchnorm_bytes(bnn: nn.Module, num_draws: int) -> int:
    """Bytes of ``num_draws`` draws' BatchNorm statistics as a model file stores them (fp32
    means and variances of every BatchNorm channel): what ``per_draw`` adds to a model's size."""
    return (
        4 * num_draws * sum(getattr(m, k).numel() for m in batchnorm_layers(bnn).values() for k in PER_DRAW_STATISTICS)
    )
