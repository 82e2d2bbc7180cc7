"""Geometry metrics of image / text embeddings (margins, relative biases, modality gap, retrieval)."""
from open_clip_sigrel.metrics.geometry import geometry_metrics

__all__ = ["geometry_metrics"]
