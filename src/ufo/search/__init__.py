"""Predict and search: subnet latency measurement and GP-NAS style predictors."""

from ufo.search.latency import BACKENDS, Latency, LatencyDataset, collect, measure
from ufo.search.predictor import GPPredictor, cross_validate, kendall_tau, mape, space_fingerprint

__all__ = [
    "BACKENDS",
    "GPPredictor",
    "Latency",
    "LatencyDataset",
    "collect",
    "cross_validate",
    "kendall_tau",
    "mape",
    "measure",
    "space_fingerprint",
]
