"""NCMI core: normalized sigmoid simplex, NCMI loss, closed-form centroids and metrics.

Knows nothing about slides or images; imports nothing else of ours.
"""

from .centroids import CentroidAccumulator, NearestCentroidClassifier, class_centroids
from .loss import CENTROID_UPDATES, VARIANTS, NCMILoss, init_centroids
from .metrics import (
    NCMIMetricAccumulator,
    class_representations,
    hdr,
    matrix_entropy,
    matrix_mutual_information_ratio,
    ncmi_metric,
)
from .simplex import FeatureCenter, NCMIError, log_nsf, nsf

__all__ = [
    "NCMIMetricAccumulator",
    "CENTROID_UPDATES",
    "VARIANTS",
    "CentroidAccumulator",
    "FeatureCenter",
    "NCMIError",
    "NCMILoss",
    "NearestCentroidClassifier",
    "class_centroids",
    "class_representations",
    "hdr",
    "init_centroids",
    "log_nsf",
    "matrix_entropy",
    "matrix_mutual_information_ratio",
    "ncmi_metric",
    "nsf",
]
