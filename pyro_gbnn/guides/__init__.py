"""Variational families (guides) for Bayesian networks; :class:`SiteGuide` is the protocol."""

from pyro_gbnn.guides.base import SiteGuide, site_key
from pyro_gbnn.guides.mean_field import MeanFieldGuide
from pyro_gbnn.guides.shared_mixture import SharedMixtureGuide
from pyro_gbnn.guides.sparse_subspace import SparseSubspaceGuide
from pyro_gbnn.guides.spike_slab import PrunedSpikeSlabGuide, SpikeSlabGuide

__all__ = [
    "MeanFieldGuide",
    "PrunedSpikeSlabGuide",
    "SharedMixtureGuide",
    "SiteGuide",
    "SparseSubspaceGuide",
    "SpikeSlabGuide",
    "site_key",
]
