"""Geometry metrics of image / text embeddings (margins, relative biases, modality gap, retrieval).

  functional    one formula per function (margins, trimmed margins, violations, modality gap, retrieval)
  separability  Thm 3.6's linear separability of the modalities
  percentile    exact numpy-'linear' percentiles, dense or streamed (import them from there)
  inputs        validation and normalisation of the features
  geometry      geometry_metrics(..., metrics=groups): the requested groups in one tiled pass
  metric        GeometryMetric: the same numbers from batches / ranks (update, merge, compute, reset)
"""
from open_clip_sigrel.metrics.functional import (
    PairStatistics,
    centred_gap_sum,
    margin_and_rel_bias,
    margins,
    modality_gap,
    pair_statistics,
    retrieval,
    trimmed_margins,
    violations,
)
from open_clip_sigrel.metrics.geometry import (
    ALL_GROUPS,
    CHEAP_GROUPS,
    GROUPS,
    geometry_metrics,
    metric_groups,
)
from open_clip_sigrel.metrics.inputs import prepare_features
from open_clip_sigrel.metrics.metric import GeometryMetric
from open_clip_sigrel.metrics.separability import linear_separability

__all__ = [
    "geometry_metrics", "GeometryMetric", "metric_groups", "GROUPS", "ALL_GROUPS", "CHEAP_GROUPS",
    "margin_and_rel_bias", "centred_gap_sum", "margins", "trimmed_margins", "violations", "modality_gap", "retrieval",
    "linear_separability", "PairStatistics", "pair_statistics", "prepare_features",
]
