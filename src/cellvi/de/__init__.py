"""Bayesian differential expression and gene-gene correlation from a trained model."""

from ._de import (
    de_statistics,
    differential_expression,
    fdr_de_prediction,
    feature_correlation_matrix,
)

__all__ = [
    "de_statistics",
    "differential_expression",
    "fdr_de_prediction",
    "feature_correlation_matrix",
]
