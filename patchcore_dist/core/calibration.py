"""What a model learns about its own scores from normal data: the score statistics, the heatmap colour
scale and the decision threshold. Pure numpy; the fit job feeds it scores of normal patches / images.
"""
from __future__ import annotations

import numpy as np

# Percentiles of the training patch scores kept in the manifest.
PATCH_PERCENTILES = (50, 90, 99, 99.9)
# Training patches scored against the memory bank to fix the model's score scale.
SCALE_SAMPLE = 20000


def patch_score_quantiles(patch_scores: np.ndarray) -> dict[str, float]:
    """``{"p50": ..., "p90": ..., "p99": ..., "p99.9": ...}`` of normal patch scores."""
    return {f"p{p}": float(np.percentile(patch_scores, p)) for p in PATCH_PERCENTILES}


def heatmap_scale(quantiles: dict[str, float]) -> tuple[float, float]:
    """The heatmap colour scale, fixed per model: typical normal patches (the median) at the cold
    end, twice the 99th percentile of normal patch scores at the hot end."""
    lo = quantiles["p50"]
    return lo, max(2.0 * quantiles["p99"], lo + 1e-6)


def threshold_at_fpr(image_scores: np.ndarray, target_fpr: float) -> float:
    """The smallest image score that at most ``target_fpr`` of the normal images exceed."""
    v = np.sort(np.asarray(image_scores, dtype=np.float64))
    allowed = int(np.floor(target_fpr * len(v)))
    return float(v[len(v) - allowed - 1])


def calibration_stats(image_scores: np.ndarray, target_fpr: float) -> dict:
    """The manifest's threshold entry from normal validation image scores."""
    v = np.sort(np.asarray(image_scores, dtype=np.float64))
    return {"threshold": threshold_at_fpr(v, target_fpr), "target_fpr": target_fpr, "validation_images": len(v),
            "validation_scores": {"min": float(v[0]), "median": float(np.median(v)), "max": float(v[-1])}}
