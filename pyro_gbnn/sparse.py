"""Sparse weights: a Normal that is exactly zero outside a set of active entries, and a
Linear kernel that multiplies by the active entries alone.

SSVI keeps only s = density x D weights of a network. Its q of a weight tensor is a
:class:`SparseNormal`: its ``loc`` and ``scale`` are dense (the active values scattered into
zeros), which is what a convolution needs, and its draws add noise drawn for the active
entries only. A Linear layer whose q allows it (``sparse_kernel``) instead builds a CSR
matrix of the active values and multiplies with ``torch.sparse`` (:func:`sparse_linear`),
under every estimator: the weight draw, local reparameterization (mean and variance as two
sparse products) and flipout. Whether that is faster than the dense product depends on the
layer's shape, the batch and the density: ``benchmarks/sparse_linear.py`` measures it.
"""

from __future__ import annotations

import warnings

import pyro.distributions as dist
import torch

from pyro_gbnn.reparameterization import apply_estimator

__all__ = ["SparseNormal", "scatter_flat", "sparse_linear"]


def scatter_flat(values: torch.Tensor, index: torch.Tensor, numel: int) -> torch.Tensor:
    """Zeros [..., numel] with ``values`` [..., s] at the flat positions ``index`` [s]; differentiable in ``values``."""
    dense = values.new_zeros((numel, *values.shape[:-1]))
    return dense.index_put((index,), values.movedim(-1, 0)).movedim(0, -1)


class SparseNormal(dist.Normal):
    """Normal(loc, scale) that is exactly 0 outside the flat positions ``index`` (sorted).

    ``loc`` and ``scale`` are dense, so estimators that need the dense moments read them as
    from any Normal; a draw is ``loc`` plus noise drawn for the s active entries only (every
    use of the location, the draw's included, flows through the dense ``loc``, where SSVI's
    gradient-addition rule hooks). With ``sparse_kernel`` a single draw also keeps its active
    values (``draw_values``) for :func:`sparse_linear`, and is built from them directly.
    """

    def __init__(
        self,
        index: torch.Tensor,
        loc_values: torch.Tensor,
        scale_values: torch.Tensor,
        shape: torch.Size,
        sparse_kernel: bool = False,
    ) -> None:
        self.index, self.loc_values, self.scale_values = index, loc_values, scale_values
        self.weight_shape, self.sparse_kernel = torch.Size(shape), sparse_kernel
        self.draw_values: torch.Tensor | None = None
        self._csr_structure: tuple[torch.Tensor, torch.Tensor] | None = None
        numel = self.weight_shape.numel()
        super().__init__(
            scatter_flat(loc_values, index, numel).view(shape),
            scatter_flat(scale_values, index, numel).view(shape),
            validate_args=False,
        )

    def expand(self, batch_shape, _instance=None):
        raise NotImplementedError("SparseNormal keeps the shape of its weight; draw batches with sample((n,))")

    def rsample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        sample_shape = torch.Size(sample_shape)
        eps = torch.randn(sample_shape + self.scale_values.shape, dtype=self.loc.dtype, device=self.loc.device)
        numel = self.weight_shape.numel()
        if self.sparse_kernel and not sample_shape:
            self.draw_values = self.loc_values + self.scale_values * eps
            return scatter_flat(self.draw_values, self.index, numel).view(self.weight_shape)
        noise = scatter_flat(self.scale_values * eps, self.index, numel)
        return self.loc + noise.view(sample_shape + self.weight_shape)

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape)

    def csr(self, values: torch.Tensor) -> torch.Tensor:
        """The [out, in] CSR matrix with ``values`` [s] at the active entries of this 2-D weight."""
        rows, columns = self.weight_shape
        if self._csr_structure is None:  # row pointers and columns, once for the products of this q
            index = self.index.long()
            crow = torch.zeros(rows + 1, dtype=torch.long, device=index.device)
            crow[1:] = torch.bincount(index // columns, minlength=rows).cumsum(0)
            self._csr_structure = crow, index % columns
        with warnings.catch_warnings():  # "CSR support is in beta": the products used here are tested
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(*self._csr_structure, values, (rows, columns), check_invariants=False)


def sparse_linear(x: torch.Tensor, q: SparseNormal, bias: torch.Tensor | None, estimator: str) -> torch.Tensor:
    """``F.linear(x, W, b)`` for W ~ ``q`` under ``estimator``, multiplying by the active entries only:
    the dense layer's estimator (:func:`~pyro_gbnn.reparameterization.apply_estimator`) with the
    CSR product in place of ``F.linear`` and the active entries' Normal and draw (``q.draw_values``)
    in place of the dense ones; ``bias`` is the layer's drawn bias."""

    def product(inputs: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return (q.csr(values) @ inputs.T).T

    active = dist.Normal(q.loc_values, q.scale_values, validate_args=False)
    out = apply_estimator(estimator, product, x.reshape(-1, x.shape[-1]), active, q.draw_values, bias, feature_dim=-1)
    return out.reshape(*x.shape[:-1], out.shape[-1])
