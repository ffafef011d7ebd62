"""Training methods, one module each; a user's method is named by its dotted path.

``METHODS`` maps the built-in names to their classes (see :class:`Method` for what a
method declares); :func:`resolve_method` turns a config's ``method`` and
``method_args`` into the object the pipeline runs.
"""

from __future__ import annotations

import inspect
from typing import Any

from pyro_gbnn.errors import UsageError
from pyro_gbnn.methods.base import Method
from pyro_gbnn.methods.deterministic import Deterministic
from pyro_gbnn.methods.gbnn2d import TwoDGBNN
from pyro_gbnn.methods.int8 import Int8
from pyro_gbnn.methods.mean_field import MeanField
from pyro_gbnn.methods.spike_slab import SpikeSlab
from pyro_gbnn.methods.ssvi import SSVI

__all__ = [
    "METHODS",
    "Method",
    "Deterministic",
    "MeanField",
    "TwoDGBNN",
    "SpikeSlab",
    "SSVI",
    "Int8",
    "method_class",
    "resolve_method",
]

METHODS: dict[str, type[Method]] = {
    "deterministic": Deterministic,
    "mean-field": MeanField,
    "2dgbnn": TwoDGBNN,
    "spike-slab": SpikeSlab,
    "ssvi": SSVI,
    "int8": Int8,
}


def method_class(name: str) -> type[Method]:
    """A built-in method by name, or a :class:`Method` subclass by ``package.module.Class``."""
    from pyro_gbnn.registry import resolve_class

    cls = resolve_class(name, METHODS, "method")
    if not (inspect.isclass(cls) and issubclass(cls, Method)):
        raise UsageError(f"method class {name!r} must subclass pyro_gbnn.methods.Method and declare its stages")
    cls.check_definition(name)
    return cls


def resolve_method(name: str, args: dict[str, Any] | None = None) -> Method:
    """``method_class(name)(**args)``; arguments its ``__init__`` rejects are a one-line error."""
    from pyro_gbnn.registry import construct

    if args is not None and not isinstance(args, dict):
        raise UsageError(f"method_args must be a mapping of keyword arguments, got {args!r}")
    return construct(method_class(name), "method", name, args or {})
