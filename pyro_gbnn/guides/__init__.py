"""Variational families (guides) for Bayesian networks."""

from pyro_gbnn.guides.mean_field import MeanFieldGuide
from pyro_gbnn.guides.shared_mixture import SharedMixtureGuide

__all__ = ["MeanFieldGuide", "SharedMixtureGuide"]
