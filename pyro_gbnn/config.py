"""Run configuration: defaults, YAML files and ``key=value`` overrides, checked against the defaults.

A config is plain data (nested dicts), so it is saved next to each run as YAML and read
back unchanged on resume. Every key a file or an override names must exist in
:data:`DEFAULTS`; a typo is an error that lists the keys accepted at that level.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from pyro_gbnn.errors import UsageError

__all__ = [
    "DEFAULTS",
    "CONFIG_DIR",
    "dataset_config_file",
    "load_config",
    "merge",
    "apply_overrides",
    "dump_config",
    "flatten",
]


def _config_dir() -> Path:
    """The shipped configs: ``pyro_gbnn/configs`` in an installed wheel (``configs/`` is
    package data there, see pyproject.toml), the checkout's ``configs/`` otherwise."""
    package = Path(__file__).resolve().parent
    installed = package / "configs"
    return installed if installed.is_dir() else package.parent / "configs"


# The shipped configs that `fit --dataset D [--method M]` starts from when no --config is
# given: the paper's network and settings per data set, the method's own file where one
# exists; the first entry is the data set's default method.
CONFIG_DIR = _config_dir()
_DATASET_CONFIGS = {
    "mnist": {
        "2dgbnn": "mnist_quick_2dgbnn.yaml",
        "mean-field": "mnist_quick.yaml",
        "spike-slab": "mnist_quick_spike_slab.yaml",
        "ssvi": "mnist_quick_ssvi.yaml",
        "int8": "mnist_quick_int8.yaml",
    },
    "cifar10": {
        "2dgbnn": "cifar10_resnet20.yaml",
        "spike-slab": "cifar10_resnet20_spike_slab.yaml",
        "ssvi": "cifar10_resnet20_ssvi.yaml",
        "int8": "cifar10_resnet20_int8.yaml",
    },
    "cifar100": {"2dgbnn": "cifar100_resnet18.yaml"},
    "imagenet": {"2dgbnn": "imagenet_resnet50.yaml"},
}

_SCHEDULE = {
    "epochs": 1,
    "lr": 0.1,
    "optimizer": "sgd",
    "momentum": 0.9,
    "nesterov": False,
    "weight_decay": 0.0,
    "schedule": "multistep",
    "milestones": [],
    "gamma": 0.2,
    "warmup_epochs": 0,
}

_VARIATIONAL = dict(
    _SCHEDULE,
    optimizer="adam",
    lr=1e-3,
    lr_scale=1e-2,
    eval_samples=8,
    num_particles=1,
    kl_warmup_epochs=0,
    kl_scale=1.0,
)

DEFAULTS: dict[str, Any] = {
    "dataset": "mnist",
    "model": "lenet",
    "method": "mean-field",
    "seed": 0,
    "init_from": None,
    "device": "auto",  # the GPU when torch sees one (torchrun: the local rank's), else the CPU; or cpu, cuda, cuda:N
    "threads": None,
    # Training arithmetic: fp32, or bf16 / fp16 autocast for the network's forward and backward
    # (parameters, KL and stage 2 stay fp32; fp16 adds a gradient scaler). bf16 wants a GPU that has it.
    "precision": "fp32",
    "progress": True,
    "tracker": "none",  # also log to "tensorboard" or "mlflow" (pyro_gbnn.tracking)
    "data": {
        "dir": "data",
        # decoded-image cache; None: $PYRO_GBNN_CACHE, else beside data you own, else ~/.cache/pyro_gbnn
        "cache_dir": None,
        "download": False,
        "val_fraction": 0.0,
        "augment": True,
        "batch_size": 128,
        "eval_batch_size": 500,
        "num_workers": 0,
        "train_subset": None,
    },
    "model_args": {},
    "method_args": {},  # keyword arguments of a user's method class (pyro_gbnn.methods); built-ins take none
    # Stage 0: deterministic pre-training (the paper's appendix I.3 for CIFAR/ImageNet).
    "deterministic": dict(_SCHEDULE, epochs=3, lr=0.1, weight_decay=5e-4),
    # Stage 1: mean-field SVI, initialised from stage 0 (appendix I.4-I.5).
    "mean_field": dict(_VARIATIONAL, epochs=2),
    # Stage 2 (2DGBNN): outliers, 2D mixture, dissolving, merging, alpha-blending.
    # See pyro_gbnn.sharing.build.SharingSettings for each key's meaning.
    "sharing": {
        "grad_batches": 20,
        "tau_w": 0.2,
        "top_grad_fraction": 0.01,
        "num_components": 6000,
        "min_cluster_size": 20,
        "merge": True,
        "merge_rule": "moments",
        "merge_tau_w2sq": None,
        "merge_tau_overlap": 1.0,
        "merge_neighbours": 3,
        "merge_tau_grad_step": 0.15,
        "merge_grad_lr": 1e-5,
        "merge_tau_var": 1e-3,
        "blend": True,
        "blend_rule": "every",
        "blend_k": 5,
        "mahalanobis_threshold": 5.991,
        "gmm_batch_size": 65536,
        "gmm_max_points": 2_000_000,
        "gmm_max_epochs": 100,
        "gmm_tol": 1e-4,
        "gmm_mode": "epoch",
    },
    # Stage 3 (2DGBNN): fine-tuning with the shared-mixture guide (appendix I.5: lr 1e-5).
    "fine_tune": dict(
        _VARIATIONAL,
        epochs=1,
        lr=1e-5,
        lr_scale=1e-3,
        semantics="tied",
        shared_prior="weight",
        kl_weighting="sum",
        merge_every=0,  # epochs between merges of close components (stage 2's tests); 0: never
    ),
    # Spike-and-slab (Saha et al. 2024): SVI from the stage-0 network, then pruning by
    # posterior inclusion probability. See pyro_gbnn.guides.spike_slab.
    "spike_slab": dict(
        _VARIATIONAL,
        epochs=2,
        prior_inclusion=0.5,
        init_inclusion=0.99,
        update_rate=1.0,
        prune_threshold=0.5,
    ),
    # Optional SVI on the pruned spike-and-slab posterior: the kept weights' mu and sigma
    # train, the mask stays fixed. 0 epochs: prune only.
    "prune": dict(_VARIATIONAL, epochs=0),
    # SSVI (Li et al. 2024): VI in a sparse subspace of fixed dimension, trained from scratch.
    # See pyro_gbnn.guides.sparse_subspace.
    "ssvi": dict(
        _VARIATIONAL,
        epochs=2,
        density=0.1,
        removal="snr_abs",
        addition="gradient",
        update_every=100,
        replacement_rate=0.3,
        update_fraction=0.75,  # the subspace stops changing after this fraction of the steps
        # Linear weights at or below this density multiply by their active entries alone (CSR).
        # benchmarks/sparse_linear.py: slower than dense at 0.05 and above, even or faster at
        # 0.02 and below for large layers (batch 128, CPU); 0 keeps every layer dense.
        sparse_kernel_max_density=0.0,
    ),
    # INT8 baseline (Subedar et al. 2021): post-training quantization of the stage-1 guide;
    # one evaluation per entry of scale_bits, the first is the headline row.
    "int8": {"loc_bits": 8, "scale_bits": [8, 4, 2, 1], "per_channel": True},
    "bnn": {
        "prior": {"class": "iid_normal", "args": {"loc": 0.0, "scale": 1.0}},
        "guide": {"class": "mean_field", "args": {"init_scale": "xavier", "xavier_gain": 0.01}},
        "estimator": "local",
        "bayesian_norm": False,
    },
    # batchnorm: "per_draw" (each of num_samples fixed draws gets BatchNorm statistics re-estimated
    # on batchnorm_batches training batches, pyro_gbnn.batchnorm; model files store them) or "running"
    # (the statistics gathered in training, over other draws: seed-dependent, less calibrated);
    # evaluation_seeds > 1: a stage's test metrics are the mean over that many seeds, with their range.
    "predict": {
        "num_samples": 30,
        "ece_bins": 15,
        "sample_chunk": 10,
        "batchnorm": "per_draw",
        "batchnorm_batches": 20,
        "evaluation_seeds": 3,
    },
}


_CLASS_SPECS = ("prior", "guide")  # {class, args}
_USER_KEYS = ("args", "model_args", "method_args")  # keys of the user's own classes


def merge(base: dict, update: dict, path: str = "") -> dict:
    """``base`` updated by ``update``; unknown keys raise :class:`UsageError`.

    Keys under a mapping whose default is empty (``model_args``, ``method_args``, prior ``args``) are free;
    ``prior`` and ``guide`` are ``{class, args}`` specs (see :mod:`pyro_gbnn.registry`).
    """
    out = copy.deepcopy(base)
    for key, value in (update or {}).items():
        where = f"{path}{key}"
        if base and key not in base:
            raise UsageError(f"unknown config key {where!r}; accepted here: {', '.join(sorted(base))}")
        if isinstance(base.get(key) if base else None, dict) and isinstance(value, dict):
            if key in _CLASS_SPECS:
                out[key] = _merge_class_spec(base[key], value)
            elif not base[key] or key in _USER_KEYS:
                out[key] = {**base[key], **value}
            else:
                out[key] = merge(base[key], value, f"{where}.")
        else:
            out[key] = _coerce(where, base.get(key) if base else None, value)
    return out


def _merge_class_spec(base: dict, update: dict) -> dict:
    """A ``{class, args}`` spec: a new class starts from its own args; the same class merges them."""
    if "class" in update and update["class"] != base.get("class"):
        return {"class": update["class"], "args": copy.deepcopy(update.get("args") or {})}
    return {**base, **update, "args": {**(base.get("args") or {}), **(update.get("args") or {})}}


def _coerce(where: str, default: Any, value: Any) -> Any:
    """Numbers written like ``1e-3`` load from YAML as strings; read them as the default's type."""
    numeric = isinstance(default, (int, float)) and not isinstance(default, bool)
    if isinstance(default, str) and isinstance(value, (int, float, bool)):
        return str(value)  # a folder named 2024 stays a folder name
    if default is None and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    if numeric and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise UsageError(f"config key {where!r} expects a number, got {value!r}") from None
    if numeric and isinstance(default, int) and isinstance(value, float) and value.is_integer():
        return int(value)  # 1e2 (YAML reads it as a string) or 100.0 where a count is meant
    return copy.deepcopy(value)


def dataset_config_file(dataset: str, method: str | None = None) -> Path | None:
    """The shipped config a run on ``dataset`` (with ``method``, else the data set's default
    method) starts from, or None when none ships for that data set (the built-in defaults
    apply). A shipped config missing from the installation is a one-line error."""
    files = _DATASET_CONFIGS.get(str(dataset).lower())
    if files is None:
        return None
    path = CONFIG_DIR / files.get(method or "", next(iter(files.values())))
    if not path.is_file():
        raise UsageError(
            f"the shipped config {path.name} is not in {str(CONFIG_DIR)!r}; reinstall pyro_gbnn "
            "(pip install pyro_gbnn) or pass --config FILE"
        )
    return path


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a.b": value}`` for every leaf of a nested config (a ``{class, args}`` spec is one leaf)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value and key not in ("prior", "guide"):
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def load_config(path: str | Path | None, base: dict | None = None) -> dict:
    """Defaults (or ``base``) updated by the YAML file at ``path``."""
    config = copy.deepcopy(DEFAULTS if base is None else base)
    if path is None:
        return config
    path = Path(path)
    if not path.is_file():
        raise UsageError(
            f"config file {str(path)!r} does not exist; pass an existing YAML file, e.g. configs/mnist_quick.yaml"
        )
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UsageError(f"config file {str(path)!r} is not valid YAML: {str(err).splitlines()[0]}") from None
    if data is None:
        return config
    if not isinstance(data, dict):
        raise UsageError(f"config file {str(path)!r} must hold a mapping of keys to values, got {type(data).__name__}")
    return merge(config, data)


def apply_overrides(config: dict, overrides: Iterable[str]) -> dict:
    """Apply ``section.key=value`` strings; values are parsed as YAML (numbers, lists, null)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UsageError(f"override {item!r} is not of the form key=value (e.g. mean_field.lr=0.001)")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        update: dict = value
        for part in reversed(key.split(".")):
            update = {part: update}
        config = merge(config, update)
    return config


def dump_config(config: dict) -> str:
    return yaml.safe_dump(config, sort_keys=False)
