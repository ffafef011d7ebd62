"""The stage-2 result: which weights are outliers, which share which 2D Gaussian, and how.

A :class:`SharingPlan` is plain tensors over the network's Bayesian weights flattened in
site order (the order of ``BayesianNetwork.site_shapes``), so it can be saved, inspected
and reloaded bit-exactly, and turned into a guide by
:class:`~pyro_gbnn.guides.SharedMixtureGuide`.

Every weight has exactly one role:

* outlier: keeps its own Normal (``outlier_loc``, ``outlier_scale``);
* inlier: shares component ``inlier_component`` (stored in the smallest integer dtype
  that holds K);
* ellipse: blends components ``ellipse_components`` [n_e, k] with ``ellipse_alphas``.

Components are 2D Gaussians over (mean, std) of a weight: ``means`` [K, 2],
``covs`` [K, 2, 2], ``counts`` [K] (alpha-weighted number of member weights).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

__all__ = ["SharingPlan", "index_dtype"]


def index_dtype(num_values: int) -> torch.dtype:
    """Smallest integer dtype that stores ``num_values`` distinct indices (0 .. num_values-1)."""
    if num_values <= 2**8:
        return torch.uint8
    if num_values <= 2**15:
        return torch.int16
    if num_values <= 2**31:
        return torch.int32
    return torch.int64


@dataclass
class SharingPlan:
    site_names: list[str]
    site_shapes: list[list[int]]
    means: torch.Tensor
    covs: torch.Tensor
    counts: torch.Tensor
    outlier_index: torch.Tensor
    outlier_loc: torch.Tensor
    outlier_scale: torch.Tensor
    inlier_index: torch.Tensor
    inlier_component: torch.Tensor
    ellipse_index: torch.Tensor
    ellipse_components: torch.Tensor
    ellipse_alphas: torch.Tensor
    report: dict[str, Any]
    merged_from: dict[str, torch.Tensor] | None = None  # {"means", "covs"} before merging, for pictures

    @property
    def num_weights(self) -> int:
        return sum(int(torch.Size(s).numel()) for s in self.site_shapes)

    @property
    def num_components(self) -> int:
        return int(self.means.shape[0])

    @property
    def mixing(self) -> torch.Tensor:
        """Mixture proportions pi_k: each component's share of the non-outlier weights."""
        return self.counts / self.counts.sum().clamp_min(1e-12)

    def index_bytes(self) -> int:
        """Bytes of the index vectors as stored for deployment.

        One code per weight in the smallest integer dtype that holds K + 2 values (a
        component, or "outlier", or "ellipse"; outliers' parameters are stored in weight
        order, so no positions are needed), plus, per ellipse weight, k component codes
        and k fp32 alphas.
        """
        code = torch.empty((), dtype=index_dtype(self.num_components + 2)).element_size()
        k = int(self.ellipse_components.shape[1]) if self.ellipse_components.dim() == 2 else 0
        component = torch.empty((), dtype=index_dtype(self.num_components)).element_size()
        return self.num_weights * code + int(self.ellipse_index.numel()) * k * (component + 4)

    def to(self, device: torch.device | str) -> SharingPlan:
        """The plan with every tensor on ``device`` (itself if they are there already)."""

        def moved(value: Any) -> Any:
            if torch.is_tensor(value):
                return value.to(device)
            return {k: moved(v) for k, v in value.items()} if isinstance(value, dict) else value

        return SharingPlan(**{f.name: moved(getattr(self, f.name)) for f in fields(self)})

    def to_state(self) -> dict[str, Any]:
        """A dict of CPU tensors, lists and numbers: saved with torch.save, loaded with
        weights_only=True on any machine."""
        return self.to("cpu").__dict__.copy()

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> SharingPlan:
        missing = [f.name for f in fields(cls) if f.name not in state and f.name != "merged_from"]
        if missing:
            raise ValueError(f"sharing plan state lacks {missing}; it was not written by SharingPlan.to_state")
        return cls(**{f.name: state[f.name] for f in fields(cls) if f.name in state})

    def check(self) -> None:
        """Every weight has exactly one role; raises ValueError otherwise."""
        n = self.num_weights
        role = torch.zeros(n, dtype=torch.int32, device=self.outlier_index.device)
        for index in (self.outlier_index, self.inlier_index, self.ellipse_index):
            role.index_add_(0, index.long(), torch.ones_like(index, dtype=torch.int32))
        if not bool((role == 1).all()):
            raise ValueError(
                f"sharing plan is inconsistent: {int((role != 1).sum())} of {n} weights have no role or several"
            )
