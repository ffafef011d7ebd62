"""2DGBNN stage 2 as plain tensor functions: outliers, 2D mixture, merging, blending.

Each step lives in its own module and works on tensors alone (no Pyro), so it can be
tested and swapped on its own; :func:`build_sharing_plan` runs them in the paper's order
and returns a :class:`SharingPlan`.
"""

from pyro_gbnn.sharing.blending import blend_weights, ellipse_mask
from pyro_gbnn.sharing.build import SharingSettings, build_sharing_plan
from pyro_gbnn.sharing.gaussians import mahalanobis2, merge_gaussians, pairwise_wasserstein2, wasserstein2
from pyro_gbnn.sharing.gmm import GMMResult, fit_gmm_2d, gmm_assign, gmm_log_likelihood
from pyro_gbnn.sharing.merging import MergeResult, merge_components
from pyro_gbnn.sharing.outliers import dissolve_small_clusters, outlier_mask
from pyro_gbnn.sharing.plan import SharingPlan

__all__ = [
    "GMMResult",
    "MergeResult",
    "SharingPlan",
    "SharingSettings",
    "blend_weights",
    "build_sharing_plan",
    "dissolve_small_clusters",
    "ellipse_mask",
    "fit_gmm_2d",
    "gmm_assign",
    "gmm_log_likelihood",
    "mahalanobis2",
    "merge_components",
    "merge_gaussians",
    "outlier_mask",
    "pairwise_wasserstein2",
    "wasserstein2",
]
