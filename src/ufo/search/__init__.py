"""Predict and search: subnet latency measurement and GP-NAS style predictors."""
