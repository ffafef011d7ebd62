"""pyro_gbnn: compressed Bayesian neural networks on Pyro and PyTorch.

Importing the package switches Pyro to module-local parameters
(``pyro.settings.set(module_local_params=True)``): parameters live in modules, so
``state_dict`` is the whole truth and two models never share state by name.
"""

from pyro_gbnn import metrics
from pyro_gbnn.diagnostics import khat_reading, to_inference_data, variational_khat
from pyro_gbnn.bayesian import BayesianNetwork
from pyro_gbnn.config import DEFAULTS, apply_overrides, load_config
from pyro_gbnn.data import load_dataset, make_loader
from pyro_gbnn.elbo import AnalyticKL_ELBO
from pyro_gbnn.guides import MeanFieldGuide, SiteGuide, site_key
from pyro_gbnn.likelihoods import Categorical, Gaussian
from pyro_gbnn.model_file import export_model, load_model
from pyro_gbnn.models import build_model
from pyro_gbnn.pipeline import load_run_model, run_fit
from pyro_gbnn.predict import fixed_draws, predict, predictive_summary
from pyro_gbnn.priors import IIDNormalPrior, LayerwiseNormalPrior, Prior, ScaleMixturePrior

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
    "apply_overrides",
    "build_model",
    "export_model",
    "khat_reading",
    "load_config",
    "load_dataset",
    "load_model",
    "load_run_model",
    "make_loader",
    "metrics",
    "fixed_draws",
    "predict",
    "predictive_summary",
    "run_fit",
    "site_key",
    "to_inference_data",
    "variational_khat",
]

__version__ = "0.1.0"
