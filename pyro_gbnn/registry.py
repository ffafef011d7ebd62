"""Build priors and guides from config specs: a built-in name or a dotted class path.

``{"class": "layerwise_normal", "args": {"method": "radford"}}`` and
``{"class": "my_package.priors.LaplacePrior", "args": {"scale": 0.1}}`` work the same way,
so a user's class is a first-class citizen of configs and the command line.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from pyro_gbnn.errors import UsageError
from pyro_gbnn.guides.base import SiteGuide
from pyro_gbnn.guides.mean_field import MeanFieldGuide
from pyro_gbnn.guides.sparse_subspace import SparseSubspaceGuide
from pyro_gbnn.guides.spike_slab import SpikeSlabGuide
from pyro_gbnn.priors import IIDNormalPrior, LayerwiseNormalPrior, Prior, ScaleMixturePrior

__all__ = ["GUIDES", "PRIORS", "build_guide", "build_prior", "construct", "resolve_class"]

PRIORS: dict[str, type[Prior]] = {
    "iid_normal": IIDNormalPrior,
    "layerwise_normal": LayerwiseNormalPrior,
    "scale_mixture": ScaleMixturePrior,
}

GUIDES: dict[str, type[SiteGuide]] = {
    "mean_field": MeanFieldGuide,
    "spike_slab": SpikeSlabGuide,
    "sparse_subspace": SparseSubspaceGuide,
}


def resolve_class(name: str, builtins: dict[str, type], kind: str) -> type:
    """A built-in by short name, or any class by ``package.module.Name``."""
    if name in builtins:
        return builtins[name]
    module_name, _, attr = str(name).rpartition(".")
    if not module_name:
        raise UsageError(
            f"unknown {kind} {name!r}; use one of {', '.join(builtins)} or a dotted path package.module.Class"
        )
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise UsageError(
            f"cannot import {kind} class {name!r} ({err}); check the dotted path and that its package is installed"
        ) from None


def _class_and_args(spec: Any, builtins: dict[str, type], kind: str) -> tuple[type, dict]:
    if not isinstance(spec, dict) or "class" not in spec:
        raise UsageError(f"{kind} spec must be a mapping with 'class' (and optional 'args'), got {spec!r}")
    args = spec.get("args") or {}
    if not isinstance(args, dict):
        raise UsageError(f"{kind} {spec['class']!r}: 'args' must be a mapping of keyword arguments, got {args!r}")
    return resolve_class(spec["class"], builtins, kind), args


def build_prior(spec: dict[str, Any]) -> Prior:
    """A :class:`Prior` from ``{"class": ..., "args": {...}}``."""
    cls, args = _class_and_args(spec, PRIORS, "prior")
    if not (inspect.isclass(cls) and issubclass(cls, Prior)):
        raise UsageError(
            f"prior class {spec['class']!r} must subclass pyro_gbnn.priors.Prior and implement prior_dist(name, "
            "module, param)"
        )
    if cls.prior_dist is Prior.prior_dist:
        raise UsageError(f"prior class {spec['class']!r} does not implement prior_dist(name, module, param)")
    return construct(cls, "prior", spec["class"], args)


def build_guide(spec: dict[str, Any], bnn) -> SiteGuide:
    """A guide for ``bnn`` from ``{"class": ..., "args": {...}}``: ``cls(bnn, **args)``."""
    cls, args = _class_and_args(spec, GUIDES, "guide")
    name = spec["class"]
    if not (inspect.isclass(cls) and issubclass(cls, SiteGuide)):
        raise UsageError(
            f"guide class {name!r} must subclass pyro_gbnn.guides.SiteGuide and implement distribution(name)"
        )
    if cls.distribution is SiteGuide.distribution:
        raise UsageError(f"guide class {name!r} does not implement distribution(name), the q of one weight site")
    return construct(cls, "guide", name, args, bnn)


def construct(cls: type, kind: str, name: str, args: dict, *positional: Any) -> Any:
    """``cls(*positional, **args)``: arguments its ``__init__`` does not take are "rejected
    args"; an error raised inside it keeps its own type and message in the one line."""
    try:
        inspect.signature(cls).bind(*positional, **args)
    except TypeError as err:
        takes = "(bnn, **args)" if positional else "(**args)"
        raise UsageError(f"{kind} {name!r} rejected args {args}: {err}; its __init__ must take {takes}") from None
    try:
        return cls(*positional, **args)
    except UsageError:
        raise
    except Exception as err:
        raise UsageError(
            f"{kind} {name!r} failed in its __init__ with args {args}: {type(err).__name__}: {err}"
        ) from err
