"""Evaluation of generated images: FD (FID with the Inception weights), KID, precision/recall
and CLIP score, at every level of the pyramid. See docs/evaluation.md."""

from .evaluate import (
    METRICS,
    NEEDS_FEATURES,
    EvaluationError,
    evaluate_pipeline,
    parse_metrics,
    run_evaluation,
)
from .features import FEATURE_NETWORKS, FeatureExtractor, build_feature_extractor, resolve_feature_name
from .reference import LevelStats, ReferenceStats, compute_reference_stats, pool_levels
from .sampling import SampleCache, SampleSettings
from .stats import FeatureStats, frechet_distance, kernel_distance, precision_recall
from .table import format_table

__all__ = [
    "FEATURE_NETWORKS",
    "METRICS",
    "NEEDS_FEATURES",
    "EvaluationError",
    "FeatureExtractor",
    "FeatureStats",
    "LevelStats",
    "ReferenceStats",
    "SampleCache",
    "SampleSettings",
    "build_feature_extractor",
    "compute_reference_stats",
    "evaluate_pipeline",
    "format_table",
    "frechet_distance",
    "kernel_distance",
    "parse_metrics",
    "pool_levels",
    "precision_recall",
    "resolve_feature_name",
    "run_evaluation",
]
