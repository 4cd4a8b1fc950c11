"""Tracking: MLflow store, per-epoch metrics callback, reports and pictures, the logged model."""

from tltoolkit.tracking.store import connect, resolve_tracking_uri

__all__ = ["connect", "resolve_tracking_uri"]
