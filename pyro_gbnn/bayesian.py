"""Turn any torch network into a Bayesian PyroModule with an explicit prior per parameter.

Every parameter tensor of the chosen layers becomes a ``PyroSample`` site named like the
parameter (``"layer1.0.conv1.weight"``), drawn from ``prior.prior_dist(name, module,
param)``. Normalisation layers stay deterministic by default: their few parameters
matter little for uncertainty and a prior on them mostly slows training. Linear and
Conv2d layers are given forwards that apply the configured gradient estimator
(:mod:`pyro_gbnn.reparameterization`) when the drawn weight comes from a Normal.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import pyro
import torch
import torch.nn.functional as F
from pyro.nn import PyroModule, PyroSample
from pyro.nn.module import to_pyro_module_
from torch import nn

from pyro_gbnn.likelihoods import Categorical
from pyro_gbnn.local_params import LocalParams
from pyro_gbnn.priors import Prior
from pyro_gbnn.reparameterization import ESTIMATORS, apply_estimator, weight_distribution
from pyro_gbnn.sparse import SparseNormal, sparse_linear

__all__ = ["BayesianNetwork", "NORM_LAYERS"]

NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


class BayesianLinear(PyroModule[nn.Linear]):
    """nn.Linear whose forward honours the layer's gradient estimator, on inputs [..., in_features]."""

    estimator = "weight"
    feature_dim = -1  # output [..., out_features]: a 3D [B, T, D] input keeps its bias on D

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        q = weight_distribution(weight)
        if isinstance(q, SparseNormal) and q.sparse_kernel and (q.draw_values is not None or self.estimator == "local"):
            return sparse_linear(x, q, self.bias, self.estimator)
        if self.estimator == "weight":
            return F.linear(x, weight, self.bias)
        return apply_estimator(self.estimator, F.linear, x, q, weight, self.bias, feature_dim=self.feature_dim)


class BayesianConv2d(PyroModule[nn.Conv2d]):
    """nn.Conv2d whose forward honours the layer's gradient estimator."""

    estimator = "weight"
    feature_dim = -3  # output [(B,) C, H, W]

    def _op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, weight, None, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding, self.padding = self.padding, (0, 0)
            try:
                return self._forward(x)
            finally:
                self.padding = padding
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if self.estimator == "weight":
            return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return apply_estimator(
            self.estimator, self._op, x, weight_distribution(weight), weight, self.bias, feature_dim=self.feature_dim
        )


_ESTIMATED_LAYERS = {nn.Linear: BayesianLinear, nn.Conv2d: BayesianConv2d}


class BayesianNetwork(LocalParams, PyroModule):
    """A Bayesian version of ``net``: prior sites for its weights, a likelihood for its outputs.

    ``bnn(x)`` returns logits for one draw of the weights from whatever distribution the
    active Pyro handlers provide (the prior when none); ``bnn.model(x, y)`` is the
    generative model used by the ELBO. ``net`` itself is left untouched: a copy is
    converted, and ``initial_values`` keeps the source weights for guides to start from.

    Args:
        net: any ``nn.Module`` mapping inputs to logits.
        prior: a :class:`~pyro_gbnn.priors.Prior`.
        likelihood: e.g. :class:`~pyro_gbnn.likelihoods.Categorical` (dataset-size scaling).
        estimator: ``"weight"`` (one weight draw per mini-batch), ``"local"`` (local
            reparameterization) or ``"flipout"``, for Linear/Conv2d layers.
        bayesian_norm: also put priors on normalisation-layer parameters.
    """

    def __init__(
        self,
        net: nn.Module,
        prior: Prior,
        likelihood: Categorical,
        estimator: str = "weight",
        bayesian_norm: bool = False,
    ) -> None:
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator {estimator!r} is unknown; use one of {ESTIMATORS}")
        if not isinstance(prior, Prior):
            raise TypeError(f"prior must be a pyro_gbnn.priors.Prior, got {type(prior).__name__}")
        super().__init__()
        self.prior = prior
        self.likelihood = likelihood
        self.estimator = estimator
        self.initial_values: dict[str, torch.Tensor] = {}
        converted = copy.deepcopy(net)
        self._site_shapes: OrderedDict[str, torch.Size] = OrderedDict()
        self._site_priors: dict[str, object] = {}
        for module_name, module in converted.named_modules():
            bayesian = not isinstance(module, NORM_LAYERS) or bayesian_norm
            params = list(module.named_parameters(recurse=False)) if bayesian else []
            if not params:
                continue
            # Only layers that own sample sites become PyroModules: the containers and the
            # deterministic layers around them stay plain nn.Modules, so a forward pass
            # pays Pyro's attribute and context machinery for the Bayesian layers alone.
            to_pyro_module_(module, recurse=False)
            layer_cls = _ESTIMATED_LAYERS.get(type(module).__mro__[1])
            if layer_cls is not None:
                module.__class__ = layer_cls
                module.estimator = estimator
            for param_name, param in params:
                name = f"{module_name}.{param_name}" if module_name else param_name
                prior_dist = prior.prior_dist(name, module, param.detach())
                self.initial_values[name] = param.detach()
                self._site_shapes[name] = param.shape
                self._site_priors[name] = prior_dist
                setattr(module, param_name, PyroSample(prior_dist))
        # Registered without PyroModule's attribute hook, and read through the ``net``
        # property, so that Pyro never prefixes the site names with "net.".
        self._modules["net"] = converted
        self._rename_sites()

    @property
    def net(self) -> nn.Module:
        """The converted network; its Bayesian layers are PyroModules whose sample sites
        carry the parameter names."""
        return self._modules["net"]

    def _rename_sites(self) -> None:
        # Sample sites are named exactly like the source network's parameters, which is
        # what users see in ``net.named_parameters()`` and what guides key on. The
        # Bayesian layers share this module's context, so one forward pass draws each
        # site once, as it would if every module in between were a PyroModule.
        for module_name, module in self.net.named_modules():
            if isinstance(module, PyroModule):
                module._pyro_name = module_name
                module._pyro_context = self._pyro_context

    def _pyro_set_supermodule(self, name, context):
        super()._pyro_set_supermodule(name, context)
        self._rename_sites()

    @property
    def site_shapes(self) -> OrderedDict[str, torch.Size]:
        """Shape of each Bayesian parameter, in network order."""
        return OrderedDict(self._site_shapes)

    def prior_distribution(self, name: str):
        """The prior of site ``name`` (event shape = the parameter's shape)."""
        return self._site_priors[name]

    def module_of(self, name: str) -> nn.Module:
        """The layer that owns site ``name``."""
        module_name, _, _ = name.rpartition(".")
        return self.net.get_submodule(module_name) if module_name else self.net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def model(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The generative model: weights from the prior, labels from the likelihood.

        The logits are recorded as the deterministic site ``"logits"`` so that training
        can report accuracy without a second forward pass.
        """
        logits = pyro.deterministic("logits", self(x))
        return self.likelihood(logits, y)
