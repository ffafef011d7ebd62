"""Variational families (guides) for Bayesian networks."""

from pyro_gbnn.guides.mean_field import MeanFieldGuide

__all__ = ["MeanFieldGuide"]
