"""One check of a whole resolved run config, before any data is loaded or any epoch trains.

Every setting's type and range, every name that must be one of a list, the device, the
method (a built-in or a dotted path, with its ``method_args``) and settings that it would
silently ignore (its ``check_config``): the first problem found is a
:class:`~pyro_gbnn.errors.UsageError` of one line that names the key, what it accepts and
the value given (the command line prints it and exits with 2).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pyro_gbnn.devices import resolve_device
from pyro_gbnn.errors import UsageError

__all__ = ["validate_config"]

Check = Callable[[Any], str | None]  # None: fine; else what the key must be


def _integer(low: int | None = None, high: int | None = None, none: bool = False) -> Check:
    def check(value: Any) -> str | None:
        if value is None and none:
            return None
        ok = isinstance(value, int) and not isinstance(value, bool)
        ok = ok and (low is None or value >= low) and (high is None or value <= high)
        if ok:
            return None
        span = f" in {low}..{high}" if high is not None else (f" >= {low}" if low is not None else "")
        return f"an integer{span}" + (" or null" if none else "")

    return check


def _number(
    low: float, high: float | None = None, open_low: bool = False, open_high: bool = False, none: bool = False
) -> Check:
    def check(value: Any) -> str | None:
        if value is None and none:
            return None
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = ok and (value > low if open_low else value >= low)
        ok = ok and (high is None or (value < high if open_high else value <= high))
        if ok:
            return None
        if high is None:
            span = f"{'>' if open_low else '>='} {low:g}"
        else:
            span = f"in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
        return f"a number {span}" + (" or null" if none else "")

    return check


def _choice(options: tuple[str, ...]) -> Check:
    return lambda value: None if value in options else f"one of {', '.join(options)}"


def _boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else "true or false"


def _integers(low: int, high: int | None = None, nonempty: bool = False) -> Check:
    single = _integer(low, high)

    def check(value: Any) -> str | None:
        if isinstance(value, list) and (value or not nonempty) and all(single(v) is None for v in value):
            return None
        span = f"in {low}..{high}" if high is not None else f">= {low}"
        return f"a {'non-empty ' if nonempty else ''}list of integers {span}"

    return check


POSITIVE = _number(0, open_low=True)
NON_NEGATIVE = _number(0)
FRACTION = _number(0, 1)
SCHEDULED = ("deterministic", "mean_field", "fine_tune", "spike_slab", "prune", "ssvi")
VARIATIONAL = SCHEDULED[1:]


def _rules() -> dict[str, Check]:
    from pyro_gbnn.batchnorm import BATCHNORM_MODES
    from pyro_gbnn.data import DATASETS
    from pyro_gbnn.guides.shared_mixture import KL_WEIGHTINGS, PRIOR_CHOICES, SEMANTICS
    from pyro_gbnn.guides.sparse_subspace import ADDITION_RULES, REMOVAL_CRITERIA
    from pyro_gbnn.models import MODELS
    from pyro_gbnn.reparameterization import ESTIMATORS
    from pyro_gbnn.sharing.build import BLEND_RULES
    from pyro_gbnn.sharing.gaussians import MERGE_RULES
    from pyro_gbnn.sharing.gmm import _MODES as GMM_MODES
    from pyro_gbnn.tracking import TRACKERS
    from pyro_gbnn.train import OPTIMIZERS, PRECISIONS, SCHEDULES

    rules: dict[str, Check] = {
        "dataset": _choice(DATASETS),
        "model": _choice(MODELS),
        "seed": _integer(0),
        "threads": _integer(1, none=True),
        "precision": _choice(PRECISIONS),
        "progress": _boolean,
        "tracker": _choice(TRACKERS),
        "data.download": _boolean,
        "data.augment": _boolean,
        "data.val_fraction": _number(0, 1, open_high=True),
        "data.batch_size": _integer(1),
        "data.eval_batch_size": _integer(1),
        "data.num_workers": _integer(0),
        "data.train_subset": _integer(1, none=True),
        "sharing.grad_batches": _integer(1),
        "sharing.tau_w": _number(0, none=True),
        "sharing.top_grad_fraction": _number(0, 1, none=True),
        "sharing.num_components": _integer(1),
        "sharing.min_cluster_size": _integer(0),
        "sharing.merge": _boolean,
        "sharing.merge_rule": _choice(MERGE_RULES),
        "sharing.merge_tau_w2sq": _number(0, none=True),
        "sharing.merge_tau_overlap": _number(0, none=True),
        "sharing.merge_neighbours": _integer(2, none=True),
        "sharing.merge_tau_grad_step": _number(0, none=True),
        "sharing.merge_grad_lr": POSITIVE,
        "sharing.merge_tau_var": _number(0, none=True),
        "sharing.blend": _boolean,
        "sharing.blend_rule": _choice(BLEND_RULES),
        "sharing.blend_k": _integer(1),
        "sharing.mahalanobis_threshold": POSITIVE,
        "sharing.gmm_batch_size": _integer(1),
        "sharing.gmm_max_points": _integer(1, none=True),
        "sharing.gmm_max_epochs": _integer(1),
        "sharing.gmm_tol": POSITIVE,
        "sharing.gmm_mode": _choice(tuple(GMM_MODES)),
        "fine_tune.semantics": _choice(SEMANTICS),
        "fine_tune.shared_prior": _choice(PRIOR_CHOICES),
        "fine_tune.kl_weighting": _choice(KL_WEIGHTINGS),
        "fine_tune.merge_every": _integer(0),
        "spike_slab.prior_inclusion": _number(0, 1, open_low=True, open_high=True),
        "spike_slab.init_inclusion": _number(0, 1, open_low=True, open_high=True),
        "spike_slab.update_rate": _number(0, 1, open_low=True),
        "spike_slab.prune_threshold": _number(0, 1, open_low=True, open_high=True),
        "ssvi.density": _number(0, 1, open_low=True),
        "ssvi.removal": _choice(REMOVAL_CRITERIA),
        "ssvi.addition": _choice(ADDITION_RULES),
        "ssvi.update_every": _integer(1),
        "ssvi.replacement_rate": FRACTION,
        "ssvi.update_fraction": FRACTION,
        "ssvi.sparse_kernel_max_density": FRACTION,
        "int8.loc_bits": _integer(2, 8),
        "int8.scale_bits": _integers(1, 8, nonempty=True),
        "int8.per_channel": _boolean,
        "bnn.estimator": _choice(ESTIMATORS),
        "bnn.bayesian_norm": _boolean,
        "predict.num_samples": _integer(1),
        "predict.ece_bins": _integer(1),
        "predict.sample_chunk": _integer(1, none=True),
        "predict.batchnorm": _choice(BATCHNORM_MODES),
        "predict.batchnorm_batches": _integer(1),
        "predict.evaluation_seeds": _integer(1),
    }
    for section in SCHEDULED:
        rules |= {
            f"{section}.epochs": _integer(0),
            f"{section}.lr": POSITIVE,
            f"{section}.optimizer": _choice(OPTIMIZERS),
            f"{section}.momentum": _number(0, 1, open_high=True),
            f"{section}.nesterov": _boolean,
            f"{section}.weight_decay": NON_NEGATIVE,
            f"{section}.schedule": _choice(SCHEDULES),
            f"{section}.milestones": _integers(1),
            f"{section}.gamma": POSITIVE,
            f"{section}.warmup_epochs": _integer(0),
        }
    for section in VARIATIONAL:
        rules |= {
            f"{section}.lr_scale": POSITIVE,
            f"{section}.eval_samples": _integer(1),
            f"{section}.num_particles": _integer(1),
            f"{section}.kl_warmup_epochs": _integer(0),
            f"{section}.kl_scale": POSITIVE,
        }
    return rules


def _lookup(config: dict, path: str) -> tuple[bool, Any]:
    """(found, value) of a dotted key; a section that is not a mapping is an error."""
    node: Any = config
    parts = path.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(node, dict):
            section = ".".join(parts[:depth])
            raise UsageError(
                f"config key {section!r} must be a mapping of settings (e.g. {section}: {{epochs: 2}}), got {node!r}"
            )
        if part not in node:
            return False, None
        node = node[part]
    return True, node


def validate_config(config: dict) -> None:
    """Raise a one-line :class:`UsageError` at the first setting of ``config`` that is out of
    type or range, names an unknown choice, asks for a missing device, or would be ignored."""
    for path, check in _rules().items():
        found, value = _lookup(config, path)
        if found:
            problem = check(value)
            if problem is not None and problem.startswith("one of "):
                raise UsageError(f"unknown {path} {value!r}; use {problem}")
            if problem is not None:
                raise UsageError(f"{path} must be {problem}, got {value!r}")
    resolve_device(config["device"])
    from pyro_gbnn.methods import resolve_method

    resolve_method(config["method"], config["method_args"]).check_config(config)
