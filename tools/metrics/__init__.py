"""Metric engine: a registry of classification, calibration and failure-detection metrics.

Numpy and scipy, and torch for row reductions of large inputs; nothing else of the project
is imported here.
"""

from . import calibration, counting, failure, kernel, ranking, scores  # noqa: F401  (register the metrics)
from ._inputs import MetricError
from .bootstrap import (
    Difference,
    Estimate,
    bootstrap_metrics,
    bootstrap_p_value,
    paired_bootstrap,
    unpaired_bootstrap,
)
from .calibration import reliability_bins
from .failure import Referral, apply_referral, confidence_scores, referral_threshold
from .registry import REGISTRY, MetricInfo, MetricResult, compute_metric

__all__ = [
    "REGISTRY",
    "Difference",
    "Estimate",
    "MetricError",
    "MetricInfo",
    "MetricResult",
    "Referral",
    "apply_referral",
    "bootstrap_metrics",
    "bootstrap_p_value",
    "compute_metric",
    "confidence_scores",
    "paired_bootstrap",
    "referral_threshold",
    "reliability_bins",
    "unpaired_bootstrap",
]
