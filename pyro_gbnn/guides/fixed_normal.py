"""A guide of fixed Normals: per-site means and standard deviations held as buffers.

The deployable form of every Normal posterior (mean-field, its quantized version, SSVI's
sparse one, where inactive weights have mean and std 0): nothing trains, and sampling is
``Normal(loc, scale).sample`` (for a sparse site, a :class:`SparseNormal` over its active
entries), the same call (and so the same random stream) as the trained guides it stands for,
so a loaded model predicts exactly as the trained one.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyro_gbnn.sparse import SparseNormal

__all__ = ["FixedNormalGuide"]


def _key(name: str) -> str:
    return name.replace(".", "/")


class FixedNormalGuide(nn.Module):
    """q(w) = prod_i N(w_i | loc_i, scale_i^2) with given tensors (``loc/<site>``,
    ``scale/<site>`` buffers, "." written "/"); a zero scale is a point mass. ``active`` (optional)
    gives sites whose weight is exactly 0 outside the int32 flat positions listed (``index/<site>``).

    It has the sampling interface of :class:`~pyro_gbnn.guides.MeanFieldGuide`
    (``site_shapes``, ``distribution``, ``sample_weights``, ``forward`` in a Pyro trace),
    so :func:`pyro_gbnn.predict.predict` and the metrics use it unchanged.
    """

    def __init__(
        self,
        locs: Mapping[str, torch.Tensor],
        scales: Mapping[str, torch.Tensor],
        active: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        if list(locs) != list(scales):
            raise ValueError("locs and scales must name the same sites in the same order")
        self.site_shapes: OrderedDict[str, torch.Size] = OrderedDict()
        for name, loc in locs.items():
            if scales[name].shape != loc.shape:
                raise ValueError(
                    f"site {name}: scale shape {tuple(scales[name].shape)} differs from loc shape {tuple(loc.shape)}"
                )
            self.site_shapes[name] = torch.Size(loc.shape)
            self.register_buffer("loc/" + _key(name), loc.detach().float().clone())
            self.register_buffer("scale/" + _key(name), scales[name].detach().float().clone())
        self.sparse_sites = list(active or {})
        for name in self.sparse_sites:
            self.register_buffer("index/" + _key(name), active[name].int().clone())

    def location(self, name: str) -> torch.Tensor:
        """The mean of site ``name``."""
        return self.get_buffer("loc/" + _key(name))

    def scale(self, name: str) -> torch.Tensor:
        """The standard deviation of site ``name``, >= 0."""
        return self.get_buffer("scale/" + _key(name))

    def distribution(self, name: str) -> dist.Distribution:
        """q of site ``name``, event shape = the parameter's shape (zero scales allowed)."""
        loc = self.location(name)
        if name in self.sparse_sites:
            index = self.get_buffer("index/" + _key(name))
            q = SparseNormal(index, loc.view(-1)[index], self.scale(name).view(-1)[index], loc.shape)
            return q.to_event(loc.dim())
        return dist.Normal(loc, self.scale(name), validate_args=False).to_event(loc.dim())

    def forward(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        return {name: pyro.sample(name, self.distribution(name)) for name in self.site_shapes}

    @torch.no_grad()
    def sample_weights(self, num_samples: int) -> dict[str, torch.Tensor]:
        """``num_samples`` independent draws of every weight, shape [S, *param.shape]."""
        return {name: self.distribution(name).sample((num_samples,)) for name in self.site_shapes}

    @torch.no_grad()
    def posterior_moments(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(mean, std) of every weight."""
        return {name: (self.location(name).clone(), self.scale(name).clone()) for name in self.site_shapes}
