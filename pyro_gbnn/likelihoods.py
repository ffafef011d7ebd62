"""Likelihoods: the observation model, scaled to the data-set size once, here."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch

__all__ = ["Categorical", "Gaussian"]


class Categorical:
    """Categorical likelihood of class labels given logits.

    The mini-batch sits in a ``pyro.plate`` of size ``dataset_size``, so its log-likelihood
    is multiplied by dataset_size / batch_size: the ELBO is then an unbiased estimate of
    the full-data ELBO and the KL term needs no extra weight.
    """

    def __init__(self, dataset_size: int) -> None:
        if int(dataset_size) < 1:
            raise ValueError(f"dataset_size must be >= 1, got {dataset_size}")
        self.dataset_size = int(dataset_size)

    def __call__(self, logits: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        batch = torch.arange(logits.shape[0], device=logits.device)
        with pyro.plate("data", self.dataset_size, subsample=batch):
            return pyro.sample("y", dist.Categorical(logits=logits), obs=y)

    def __repr__(self) -> str:
        return f"Categorical(dataset_size={self.dataset_size})"


class Gaussian:
    """Gaussian likelihood N(y | f(x), scale^2) for regression, with the same data-set scaling."""

    def __init__(self, dataset_size: int, scale: float = 1.0) -> None:
        if int(dataset_size) < 1 or scale <= 0:
            raise ValueError(f"need dataset_size >= 1 and scale > 0, got {dataset_size}, {scale}")
        self.dataset_size = int(dataset_size)
        self.scale = float(scale)

    def __call__(self, outputs: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        batch = torch.arange(outputs.shape[0], device=outputs.device)
        with pyro.plate("data", self.dataset_size, subsample=batch):
            return pyro.sample("y", dist.Normal(outputs.squeeze(-1), self.scale), obs=y)

    def __repr__(self) -> str:
        return f"Gaussian(dataset_size={self.dataset_size}, scale={self.scale})"
