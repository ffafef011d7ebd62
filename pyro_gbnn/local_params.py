"""Module-local Pyro parameters without changing a global setting.

A PyroModule's parameters go to Pyro's global parameter store, keyed by name, unless
``pyro.settings`` has ``module_local_params`` on; then they live in the module, two models
never share state by name, and ``state_dict`` is the whole truth. Pyro reads that setting
when a PyroModule is built (its call context) and while it runs, so :class:`LocalParams`
turns it on for exactly those moments (every ``__init__`` of a subclass, and ``__call__``)
instead of for the whole process, and a user's own Pyro code keeps Pyro's defaults.
"""

from __future__ import annotations

import functools
from typing import Any

import pyro

__all__ = ["LocalParams", "local_params"]


def local_params() -> Any:
    """The context in which Pyro keeps PyroModule parameters in their modules."""
    return pyro.settings.context(module_local_params=True)


class LocalParams:
    """Mixin before ``PyroModule`` in a class's bases: its instances (and its subclasses',
    built-in or a user's) are built and called with module-local parameters."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is not None:

            @functools.wraps(init)
            def built_locally(self: Any, *args: Any, **kwargs: Any) -> None:
                with local_params():
                    init(self, *args, **kwargs)

            setattr(cls, "__init__", built_locally)  # noqa: B010 (mypy refuses assigning to a method)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with local_params():
            return super().__call__(*args, **kwargs)  # type: ignore[misc]
