"""What a training method is: its stages in order, how each runs and how its model is rebuilt.

A stage ``s`` is two methods of the class: ``stage_s(run, net, resume)`` trains (or
transforms) and records its test metrics and outputs through the
:class:`~pyro_gbnn.stages.FitRun` (``run.finish_stage``), and ``model_s(run, net)``
rebuilds the stage's (network, guide) from those saved outputs. The run layer
(:mod:`pyro_gbnn.pipeline`) runs the stages, checkpoints after each epoch and stage,
resumes, and times them; a stage writes a file of its own only beside them (2DGBNN's
``sharing_plan.pt``, atomically). Subclass a method to add stages after its own (2DGBNN is mean-field plus
``sharing`` and ``fine_tune``); a user's method is named by its dotted path
(``--method my_research.ColdMeanField``), its ``__init__`` arguments come from
``method_args`` in the config.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from torch import nn

from pyro_gbnn.errors import UsageError

if TYPE_CHECKING:
    from pyro_gbnn.stages import FitRun

__all__ = ["Method"]

GUIDE_USES = ("none", "any", "mean_field")


class Method:
    """A training method; see the module docstring for the ``stage_*`` / ``model_*`` protocol."""

    stages: ClassVar[tuple[str, ...]] = ()
    training_stage: ClassVar[str] = ""  # the stage whose ``epochs`` the command line's --epochs sets
    guide_use: ClassVar[str] = (
        "none"  # bnn.guide: "any" guide trains, a "mean_field" subclass is required, or "none" is read
    )
    own_guide: ClassVar[str] = "no guide"  # what the method trains instead, for the "bnn.guide is not used" error

    def run_stage(self, stage: str, run: FitRun, net: nn.Module, resume: dict | None) -> None:
        """Run ``stage``; ``resume`` is the checkpoint of a run killed inside it, else None."""
        getattr(self, f"stage_{stage}")(run, net, resume)

    def model_after(self, stage: str, run: FitRun, net: nn.Module) -> tuple[nn.Module, nn.Module | None]:
        """(network, guide) after the finished ``stage``; ``net`` is a freshly built network."""
        return getattr(self, f"model_{stage}")(run, net)

    def check_config(self, config: dict) -> None:
        """A one-line :class:`UsageError` for a setting this method would ignore or cannot use;
        runs before any data is loaded. The default checks ``bnn.guide`` against :attr:`guide_use`."""
        from pyro_gbnn.config import DEFAULTS
        from pyro_gbnn.guides import MeanFieldGuide
        from pyro_gbnn.registry import GUIDES, resolve_class

        guide, name = config["bnn"]["guide"], config["method"]
        if self.guide_use == "none" and guide != DEFAULTS["bnn"]["guide"]:
            raise UsageError(
                f"bnn.guide is not used by method {name} (it trains {self.own_guide}); remove bnn.guide from the config"
            )
        if self.guide_use == "mean_field" and not issubclass(
            resolve_class(guide["class"], GUIDES, "guide"), MeanFieldGuide
        ):
            raise UsageError(
                f"method {name} starts from a mean-field posterior; set bnn.guide.class to mean_field (got "
                f"{guide.get('class')!r})"
            )

    @classmethod
    def check_definition(cls, name: str) -> None:
        """A one-line error if the class does not declare runnable stages."""
        if not cls.stages:
            raise UsageError(f"method {name!r} declares no stages; set stages = (...) on the class")
        for stage in cls.stages:
            for prefix in ("stage_", "model_"):
                if not callable(getattr(cls, prefix + stage, None)):
                    raise UsageError(
                        f"method {name!r} declares stage {stage!r} but has no {prefix}{stage}(self, run, "
                        f"net{', resume' if prefix == 'stage_' else ''}) method"
                    )
        if cls.training_stage not in cls.stages:
            raise UsageError(
                f"method {name!r}: training_stage {cls.training_stage!r} is not one of its stages {cls.stages}"
            )
        if cls.guide_use not in GUIDE_USES:
            raise UsageError(f"method {name!r}: guide_use {cls.guide_use!r} is not one of {GUIDE_USES}")
