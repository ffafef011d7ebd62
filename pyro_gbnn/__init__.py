"""pyro_gbnn: compressed Bayesian neural networks on Pyro and PyTorch.

The names below load on first use (PEP 562), so ``import pyro_gbnn`` prints nothing and
loads neither ArviZ nor matplotlib; only ``predict`` and its two helpers load at once (the
subpackage :mod:`pyro_gbnn.predict` would otherwise shadow the function of that name).
No global Pyro setting changes: the package's modules keep their parameters to themselves
while they run (:mod:`pyro_gbnn.local_params`).
"""

from __future__ import annotations

import importlib
from typing import Any

from pyro_gbnn.predict import fixed_draws, predict, predictive_summary
from pyro_gbnn.version import __version__

__all__ = [
    "AnalyticKL_ELBO",
    "BayesianNetwork",
    "Categorical",
    "DEFAULTS",
    "Gaussian",
    "IIDNormalPrior",
    "LayerwiseNormalPrior",
    "MeanFieldGuide",
    "Prior",
    "ScaleMixturePrior",
    "SiteGuide",
    "__version__",
    "apply_overrides",
    "build_model",
    "export_model",
    "fixed_draws",
    "khat_reading",
    "load_config",
    "load_dataset",
    "load_model",
    "load_run_model",
    "make_loader",
    "metrics",
    "predict",
    "predictive_summary",
    "run_fit",
    "site_key",
    "to_inference_data",
    "variational_khat",
]

_WHERE = {  # public name -> the module that defines it
    "AnalyticKL_ELBO": "elbo",
    "BayesianNetwork": "bayesian",
    "Categorical": "likelihoods",
    "DEFAULTS": "config",
    "Gaussian": "likelihoods",
    "IIDNormalPrior": "priors",
    "LayerwiseNormalPrior": "priors",
    "MeanFieldGuide": "guides",
    "Prior": "priors",
    "ScaleMixturePrior": "priors",
    "SiteGuide": "guides",
    "apply_overrides": "config",
    "build_model": "models",
    "export_model": "model_file",
    "khat_reading": "diagnostics",
    "load_config": "config",
    "load_dataset": "data",
    "load_model": "model_file",
    "load_run_model": "pipeline",
    "make_loader": "data",
    "run_fit": "pipeline",
    "site_key": "guides",
    "to_inference_data": "diagnostics",
    "variational_khat": "diagnostics",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(f"pyro_gbnn.{_WHERE[name]}"), name)
    elif name == "metrics":
        value = importlib.import_module("pyro_gbnn.metrics")
    else:
        raise AttributeError(f"module 'pyro_gbnn' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
