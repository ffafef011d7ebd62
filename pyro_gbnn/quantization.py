"""Post-training quantization of a mean-field BNN (Subedar et al., 2021).

The INT8 baseline of the 2DGBNN paper's Table 4 ("INT8 SIGMA4/2/1"): every mean is
stored as a signed 8-bit code, every standard deviation as an unsigned 4-, 2- or 1-bit
code, each tensor (or each output channel) with its own fp32 scale. Quantization is
simulated: codes are dequantized once and the network then runs in float, so the
predictive distribution is the one the stored integers describe. Model size is the
packed size of the codes plus their scales and zero points; the deterministic
normalisation parameters of the network are not in the guide and are counted by the
caller at 4 bytes each.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import nn

from pyro_gbnn.errors import UsageError
from pyro_gbnn.guides.fixed_normal import FixedNormalGuide

__all__ = ["QuantizedTensor", "quantize_symmetric", "quantize_affine", "QuantizedMeanFieldGuide", "quantize_mean_field"]


class QuantizedTensor(NamedTuple):
    """Integer ``codes`` (shape ``shape``) with fp32 ``scale`` and, if affine, fp32 ``zero_point``.

    ``scale`` / ``zero_point`` are scalars, or [C] tensors when ``per_channel`` (one per
    index of ``channel_dim``). Value = codes * scale (+ zero_point).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    bits: int
    per_channel: bool
    shape: torch.Size
    channel_dim: int = 0

    def dequantize(self) -> torch.Tensor:
        """The float32 tensor the codes stand for, shape ``shape``."""
        x = self.codes.float() * _broadcast(self.scale, self.per_channel, len(self.shape), self.channel_dim)
        if self.zero_point is None:
            return x
        return x + _broadcast(self.zero_point, self.per_channel, len(self.shape), self.channel_dim)

    def num_bytes(self) -> int:
        """Storage: codes packed at ``bits`` bits each (whole bytes per tensor), 4 bytes per fp32 scale / zero point."""
        packed = math.ceil(self.codes.numel() * self.bits / 8)
        return packed + 4 * self.scale.numel() + (0 if self.zero_point is None else 4 * self.zero_point.numel())


def _broadcast(t: torch.Tensor, per_channel: bool, ndim: int, channel_dim: int) -> torch.Tensor:
    """A per-channel [C] tensor viewed to broadcast along ``channel_dim`` of an ``ndim`` tensor."""
    if not per_channel:
        return t
    view = [1] * ndim
    view[channel_dim] = -1
    return t.view(view)


def _check_bits(bits: int, low: int, kind: str) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not low <= bits <= 8:
        raise UsageError(f"{kind} quantization needs bits to be an integer in {low}..8, got {bits!r}")


def _channel_ranges(x: torch.Tensor, per_channel: bool, channel_dim: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(min, max) per channel ([C]) or of the whole tensor (scalars); per-channel only for dim >= 2."""
    if per_channel and x.dim() >= 2:
        rows = x.movedim(channel_dim, 0).reshape(x.shape[channel_dim], -1)
        return rows.amin(1), rows.amax(1), True
    return x.min(), x.max(), False


def _divide(x: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """x / step, with a zero step (constant channel) read as 1 so its codes are 0 and exact."""
    return x / torch.where(step > 0, step, torch.ones_like(step))


def quantize_symmetric(
    x: torch.Tensor, bits: int = 8, per_channel: bool = True, channel_dim: int = 0
) -> QuantizedTensor:
    """Signed symmetric quantization, for means: scale = max|x| / (2^(bits-1) - 1), no zero point.

    Zero maps to code 0 exactly, so weights pruned to zero stay zero and the sign of
    every mean is kept. The grid is [-q, q] with q = 2^(bits-1) - 1 (the code -2^(bits-1)
    is unused, as in TensorRT/PyTorch symmetric int8); bits = 1 would leave only zero,
    so 2..8 are accepted. Codes are int8. A channel of zeros gets scale 0 and is exact.
    """
    _check_bits(bits, 2, "symmetric")
    x = x.detach().float()
    qmax = 2 ** (bits - 1) - 1
    lo, hi, per_channel = _channel_ranges(x, per_channel, channel_dim)
    scale = torch.maximum(lo.abs(), hi.abs()) / qmax
    step = _broadcast(scale, per_channel, x.dim(), channel_dim)
    codes = torch.round(_divide(x, step)).clamp_(-qmax, qmax).to(torch.int8)
    return QuantizedTensor(codes, scale, None, bits, per_channel, x.shape, channel_dim)


def quantize_affine(x: torch.Tensor, bits: int = 8, per_channel: bool = True, channel_dim: int = 0) -> QuantizedTensor:
    """Unsigned min/max quantization, for standard deviations: 2^bits levels from min to max.

    value = zero_point + code * scale with zero_point = min (an fp32 offset, not an
    integer code) and scale = (max - min) / (2^bits - 1). The grid is exactly [min, max]
    and is not widened to contain 0: a std needs no exact zero but must stay > 0, and
    every level is >= min, so positive inputs stay positive. With 1 bit the two levels are min and max of the tensor
    (or channel). Codes are uint8. A constant channel gets scale 0 and is exact.
    """
    _check_bits(bits, 1, "affine")
    x = x.detach().float()
    lo, hi, per_channel = _channel_ranges(x, per_channel, channel_dim)
    scale = (hi - lo) / (2**bits - 1)
    offset, step = (_broadcast(t, per_channel, x.dim(), channel_dim) for t in (lo, scale))
    codes = torch.round(_divide(x - offset, step)).clamp_(0, 2**bits - 1).to(torch.uint8)
    return QuantizedTensor(codes, scale, lo, bits, per_channel, x.shape, channel_dim)


class QuantizedMeanFieldGuide(FixedNormalGuide):
    """q(w) = prod_i N(w_i | dequantized mean_i, dequantized std_i^2): a quantized mean-field guide.

    A :class:`~pyro_gbnn.guides.fixed_normal.FixedNormalGuide` of the dequantized means
    and stds (stds floored at the smallest positive float), nothing trainable; keeps the
    codes (``quantized``: {site: (mean codes, std codes)}) for export and their packed size.
    """

    def __init__(self, quantized: Mapping[str, tuple[QuantizedTensor, QuantizedTensor]]) -> None:
        tiny = torch.finfo(torch.float32).tiny
        super().__init__(
            {name: loc.dequantize() for name, (loc, _) in quantized.items()},
            {name: scale.dequantize().clamp_min(tiny) for name, (_, scale) in quantized.items()},
        )
        self.quantized = OrderedDict(quantized)
        self.site_bytes = {name: (loc.num_bytes(), scale.num_bytes()) for name, (loc, scale) in quantized.items()}

    def size_bytes(self) -> int:
        """Packed bytes of all means and stds with their scales and zero points.

        The model size of an INT8 row; the network's deterministic parameters
        (normalisation layers) are not part of the guide and are added by the caller at
        4 bytes each.
        """
        return sum(loc + scale for loc, scale in self.site_bytes.values())


def quantize_mean_field(
    guide: nn.Module, loc_bits: int = 8, scale_bits: int = 8, per_channel: bool = True
) -> QuantizedMeanFieldGuide:
    """Quantize a trained mean-field guide after training, as Subedar et al. (2021) do.

    Means: :func:`quantize_symmetric` at ``loc_bits`` (2..8). Stds: sigma = softplus(rho)
    itself (not log sigma or rho), :func:`quantize_affine` at ``scale_bits`` (1..8).
    Subedar et al. quantize sigma in linear space, and Table 4 of 2DGBNN reports that
    baseline; a linear min/max grid also keeps every level within [min sigma, max sigma],
    so even 1 bit (two levels) gives valid positive stds. (A log-space grid would keep
    more relative precision for small sigmas, but it is not the baseline.) Per channel =
    one scale per output channel (dim 0) of each weight with dim >= 2; biases per tensor.
    ``guide`` needs ``posterior_moments()`` -> {site: (mean, std)}, as MeanFieldGuide has.
    """
    _check_bits(loc_bits, 2, "symmetric (means)")
    _check_bits(scale_bits, 1, "affine (stds)")
    tiny = torch.finfo(torch.float32).tiny
    quantized = OrderedDict()
    for name, (loc, std) in guide.posterior_moments().items():
        quantized[name] = (
            quantize_symmetric(loc, loc_bits, per_channel),
            quantize_affine(std.float().clamp_min(tiny), scale_bits, per_channel),
        )
    return QuantizedMeanFieldGuide(quantized)
