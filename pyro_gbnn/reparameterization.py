"""Gradient estimators for Bayesian Linear/Conv2d layers, as explicit functional operations.

With a factorised Normal q(W) = N(loc, scale^2), the pre-activation of a linear layer is
Gaussian given its input, so it can be sampled directly (local reparameterization,
Kingma et al. 2015) or the weight noise can be decorrelated across the mini-batch by
random sign flips (flipout, Wen et al. 2018). Both lower the variance of the gradient
compared with one shared weight draw per mini-batch, at the price of extra matmuls.

Which distribution drew a weight is known to the guide, not the layer, so the ELBO
runs model and guide inside :func:`record_weight_distributions`: a Pyro effect handler
that notes the Normal behind each drawn weight tensor. A layer then looks its weight up
with :func:`weight_distribution` and, if found, applies its estimator; if not (prior
samples, a non-Normal guide, a shared-component weight), it uses the drawn value.

A layer also says along which dimension of its output the features lie, counted from the
end (``feature_dim``: -1 for Linear on inputs of any rank, [..., F]; -3 for Conv2d,
[..., C, H, W]), so that per-feature vectors such as the bias broadcast over every other
dimension without a copy.
"""

from __future__ import annotations

import contextvars
import math
from collections.abc import Callable

import pyro.distributions as dist
import torch
from pyro.poutine.messenger import Messenger

__all__ = [
    "ESTIMATORS",
    "record_weight_distributions",
    "weight_distribution",
    "local_reparameterized",
    "flipout",
    "apply_estimator",
    "per_feature",
    "rademacher",
    "sample_gaussian",
]

ESTIMATORS = ("weight", "local", "flipout")

_ACTIVE_RECORD: contextvars.ContextVar[record_weight_distributions | None] = contextvars.ContextVar(
    "pyro_gbnn_weight_record", default=None
)


def _as_normal(fn: dist.Distribution) -> dist.Normal | None:
    while isinstance(fn, (dist.Independent, dist.torch.Independent)):
        fn = fn.base_dist
    return fn if isinstance(fn, (dist.Normal, dist.torch.Normal)) else None


class record_weight_distributions(Messenger):
    """Within this context, remember which Normal drew each sampled tensor.

    The first distribution to produce a value wins: under ``replay`` the model re-uses
    the guide's tensor, so the guide's q is recorded, not the model's prior. Without a
    guide the prior is recorded, which makes the estimators sample from the prior.
    """

    def __init__(self) -> None:
        super().__init__()
        self._by_id: dict[int, tuple[torch.Tensor, dist.Normal | None]] = {}

    def __enter__(self):
        self._token = _ACTIVE_RECORD.set(self)
        return super().__enter__()

    def __exit__(self, *exc):
        _ACTIVE_RECORD.reset(self._token)
        self._by_id.clear()
        return super().__exit__(*exc)

    def _pyro_post_sample(self, msg) -> None:
        value = msg["value"]
        if msg["is_observed"] or not isinstance(value, torch.Tensor) or id(value) in self._by_id:
            return
        normal = _as_normal(msg["fn"])
        if normal is not None and normal.batch_shape != value.shape:
            normal = None
        # Non-Normal draws are recorded too (as None), so a later site re-using the value
        # (the model's prior under replay) cannot claim it.
        self._by_id[id(value)] = (value, normal)

    def lookup(self, value: torch.Tensor) -> dist.Normal | None:
        entry = self._by_id.get(id(value))
        return entry[1] if entry is not None and entry[0] is value else None


def weight_distribution(value: torch.Tensor) -> dist.Normal | None:
    """The Normal that drew ``value`` in the active record, or None."""
    record = _ACTIVE_RECORD.get()
    return None if record is None else record.lookup(value)


_SIGN_TABLES: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def rademacher(shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
    """Independent fair signs +-1 of ``shape``, from uniform random bytes, eight signs per byte
    (least significant bit first): the CPU generator draws one value at a time on one thread,
    and one draw per sign cost flipout a quarter of its step (ResNet-20, batch 128); this draws
    an eighth as many, and turns each byte into its eight signs by one table lookup."""
    n = math.prod(shape)
    key = (like.dtype, like.device)
    if key not in _SIGN_TABLES:
        bits = (torch.arange(256).unsqueeze(-1) >> torch.arange(8)) & 1
        _SIGN_TABLES[key] = (bits * 2 - 1).to(dtype=like.dtype, device=like.device)
    packed = torch.randint(0, 256, ((n + 7) // 8,), dtype=torch.uint8, device=like.device)
    return _SIGN_TABLES[key].index_select(0, packed.long()).view(-1)[:n].view(shape)


class _SampledGaussian(torch.autograd.Function):
    """mean + sqrt(var + 1e-16) * eps, eps ~ N(0, 1): the sampled output of local
    reparameterization in one function, so the step makes fewer passes over the activations
    and the backward pass keeps one tensor, eps / (2 sqrt(var + 1e-16)) = d out / d var."""

    @staticmethod
    def forward(ctx, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        std = torch.add(var, 1e-16).sqrt_()
        eps = torch.randn(mean.shape, dtype=mean.dtype, device=mean.device)  # in the output's logical order
        ctx.save_for_backward(torch.div(eps, std).mul_(0.5))
        return torch.addcmul(mean, std, eps)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        (d_var,) = ctx.saved_tensors
        return grad, grad * d_var


def sample_gaussian(mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """One draw of N(mean, var + 1e-16) per element (``var`` broadcasts to ``mean``), differentiable in both."""
    return _SampledGaussian.apply(mean, var.expand_as(mean))


def per_feature(values: torch.Tensor, feature_dim: int) -> torch.Tensor:
    """A view of ``values`` [F] that broadcasts along an output's ``feature_dim`` (counted from the end).

    Counting from the end keeps the bias of a Linear on [B, T, D] inputs on the last dim
    and that of a Conv2d on its channels, batched or not.
    """
    if feature_dim >= 0:
        raise ValueError(f"feature_dim must count from the end (-1 for Linear, -3 for Conv2d), got {feature_dim}")
    return values.view((-1,) + (1,) * (-1 - feature_dim))


def local_reparameterized(
    op: Callable[..., torch.Tensor],
    x: torch.Tensor,
    weight: dist.Normal,
    bias: torch.Tensor | dist.Normal | None,
    *,
    feature_dim: int,
) -> torch.Tensor:
    """Sample ``op(x, W) + b`` from its exact Gaussian marginal, independently per output element.

    ``op`` is a linear map in W (``F.linear`` or a configured ``F.conv2d``) whose output
    features lie along ``feature_dim`` (see :func:`per_feature`).
    mean = op(x, loc) + E[b]; var = op(x^2, scale^2) + Var[b].
    """
    mean = op(x, weight.loc)
    var = op(x * x, weight.scale * weight.scale)
    if isinstance(bias, dist.Normal):
        mean = mean + per_feature(bias.loc, feature_dim)
        var = var + per_feature(bias.scale * bias.scale, feature_dim)
    elif bias is not None:
        mean = mean + per_feature(bias, feature_dim)
    return sample_gaussian(mean, var)


def flipout(
    op: Callable[..., torch.Tensor],
    x: torch.Tensor,
    weight: dist.Normal,
    weight_value: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    feature_dim: int,
) -> torch.Tensor:
    """op(x, loc) + op(x * s, W - loc) * r with random signs s, r (Wen et al. 2018).

    ``weight_value`` is the guide's draw of W, so the perturbation W - loc is the one the
    ELBO's KL and any Monte-Carlo term see. The signs have the shapes of the input and the
    output, one per element, as for Conv2d (and in TFP and bayesian-torch): every output
    element's marginal is exact, and the positions of a sequence [B, T, D] are decorrelated
    like examples, as under local reparameterization. ``feature_dim`` places the bias.
    """
    mean = op(x, weight.loc)
    sign_in = rademacher(x.shape, x)
    perturbed = op(x * sign_in, weight_value - weight.loc)
    out = torch.addcmul(mean, perturbed, rademacher(mean.shape, mean))
    if bias is not None:
        out = out + per_feature(bias, feature_dim)
    return out


def apply_estimator(
    estimator: str,
    op: Callable[..., torch.Tensor],
    x: torch.Tensor,
    weight: dist.Normal | None,
    weight_value: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    feature_dim: int,
) -> torch.Tensor:
    """``op(x, W) + b`` under ``estimator`` for W = ``weight_value`` drawn from the Normal ``weight``
    (None when no Normal drew it: the drawn value is used); under ``"local"`` the bias's own
    Normal, if one drew it, enters the output's mean and variance."""
    if weight is None or estimator == "weight":
        out = op(x, weight_value)
        return out if bias is None else out + per_feature(bias, feature_dim)
    if estimator == "local":
        q_bias = weight_distribution(bias) if bias is not None else None
        return local_reparameterized(op, x, weight, q_bias if q_bias is not None else bias, feature_dim=feature_dim)
    return flipout(op, x, weight, weight_value, bias, feature_dim=feature_dim)
