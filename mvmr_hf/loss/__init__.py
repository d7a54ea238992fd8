"""The MV-MR objective: distance correlation (appendix A, eq. 11-14) in :mod:`.dcor`, and the loss
built on it (eq. 4-10, with the feature-matching term, not in the paper) in :mod:`.objective`.
"""

from mvmr_hf.loss.dcor import (
    CenteredDistances,
    centered_distances,
    check_batch_size,
    check_estimator,
    dcor_from_centered,
    distance_correlation,
    gather_no_grad,
    gather_with_grad,
    min_batch_size,
    pairwise_distances,
)
from mvmr_hf.loss.objective import FeatureMatching, LossOutput, MVMRLoss, invariance, variance_hinge

__all__ = [
    "CenteredDistances",
    "FeatureMatching",
    "LossOutput",
    "MVMRLoss",
    "centered_distances",
    "check_batch_size",
    "check_estimator",
    "dcor_from_centered",
    "distance_correlation",
    "gather_no_grad",
    "gather_with_grad",
    "invariance",
    "min_batch_size",
    "pairwise_distances",
    "variance_hinge",
]
