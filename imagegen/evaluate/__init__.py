"""Evaluation: pure metric functions on features (metrics.py)."""

from .metrics import (class_coverage, density_coverage, frechet_distance, frechet_distance_from_stats,
                      gaussian_stats, inception_score, kid, precision_recall)

__all__ = ["class_coverage", "density_coverage", "frechet_distance", "frechet_distance_from_stats",
           "gaussian_stats", "inception_score", "kid", "precision_recall"]
