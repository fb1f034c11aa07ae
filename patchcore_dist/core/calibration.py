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


def peak_normalised(anomaly_map: np.ndarray, image_score: float) -> np.ndarray:
    """The anomaly map scaled so that its maximum equals the image score.

    Bilinear upsampling and Gaussian smoothing lower a map's peaks below the largest patch score,
    so an unscaled map of a defect that the image score flags can stay in the cold colours. Scaled,
    the map keeps its shape and its hottest pixel reads the image score itself: on a scale whose
    centre is the decision threshold, an image above the threshold is hot at its defect and an image
    below it never reaches the threshold colour.
    """
    peak = float(anomaly_map.max())
    if not np.isfinite(image_score) or peak <= 0:
        return anomaly_map
    return anomaly_map * np.float32(image_score / peak)


def normal_reference(image_scores: np.ndarray, anomaly_maps: list[np.ndarray]) -> dict:
    """What drawn normal images look like: the median pixel of their peak-normalised anomaly maps (the
    heatmap's cold end) and the quantiles of their image scores."""
    s = np.asarray(image_scores, dtype=np.float64)
    pixels = np.concatenate([peak_normalised(m, v).ravel() for m, v in zip(anomaly_maps, s)])
    p99 = float(np.percentile(s, 99))
    return {"cold": float(np.median(pixels)), "images": int(len(s)), "p50": float(np.percentile(s, 50)),
            "p99": p99, "above_p99": int((s > p99).sum()), "max": float(s.max())}


def heatmap_scale(cold: float, threshold: float) -> tuple[float, float]:
    """The heatmap colour scale [lo, hi], fixed per model: normal images' typical level at the cold end
    and the decision threshold at the centre (:data:`THRESHOLD_LEVEL`), so hi = 2 x threshold - cold.
    A threshold at or below the cold level (nothing to tell apart) gets a span of half the cold level."""
    span = threshold - cold
    if span <= 1e-6 * max(1.0, abs(cold)):  # degenerate (e.g. one training image): a visible range anyway
        span = max(0.5 * abs(cold), 1e-6)
    return cold, cold + 2.0 * span


def normalized_scores(scores: np.ndarray, threshold: float, cold: float) -> np.ndarray:
    """Image scores on the scale users of other tools expect: 0.5 at the decision threshold, 0 at
    normal images' typical level ``cold`` (the heatmap's cold end), 1 at the heatmap's hot end
    (2 x threshold - cold); linear, not clipped, so the order of strong anomalies is kept. A threshold
    at or below the cold level gets the span :func:`heatmap_scale` gives it."""
    lo, hi = heatmap_scale(cold, threshold)
    return 0.5 + (np.asarray(scores, dtype=np.float64) - threshold) / (hi - lo)


# Where the decision threshold sits on the heatmap scale (0 = cold end, 1 = hot end).
THRESHOLD_LEVEL = 0.5


def threshold_at_fpr(image_scores: np.ndarray, target_fpr: float) -> float:
    """The smallest image score that at most ``target_fpr`` of the normal images exceed."""
    v = np.sort(np.asarray(image_scores, dtype=np.float64))
    allowed = int(np.floor(target_fpr * len(v)))
    return float(v[len(v) - allowed - 1])


# Normal images below which a threshold is called unreliable (the fit warns): with n images no
# false-positive rate below 1/n can be told apart from zero, and the threshold is one of few scores.
MIN_THRESHOLD_IMAGES = 20


def calibration_stats(image_scores: np.ndarray, target_fpr: float, source: str) -> dict:
    """The manifest's decision entry from the image scores of normal images: the threshold at
    ``target_fpr``, where it came from (``source``), how many images it rests on, the false-positive
    rate it gives on them and the smallest rate they can resolve (1 / n)."""
    v = np.sort(np.asarray(image_scores, dtype=np.float64))
    t = threshold_at_fpr(v, target_fpr)
    return {"threshold": t, "threshold_source": source, "threshold_images": len(v), "target_fpr": target_fpr,
            "calibration_fpr": float((v > t).mean()), "fpr_resolution": 1.0 / len(v),
            "validation_images": len(v),
            "validation_scores": {"min": float(v[0]), "median": float(np.median(v)), "max": float(v[-1])}}


def describe_threshold(stats: dict) -> tuple[str, bool]:
    """One sentence on a calibrated threshold (how many images, what FPR they support) and whether it is
    unreliable (fewer than :data:`MIN_THRESHOLD_IMAGES` images)."""
    n, fpr = stats["threshold_images"], stats["target_fpr"]
    line = (f"threshold {stats['threshold']:.4g} at target FPR {fpr:.2%}, from {n} {stats['threshold_source']}: "
            f"{stats['calibration_fpr']:.1%} of them above it; {n} images resolve FPRs down to "
            f"{stats['fpr_resolution']:.1%}")
    weak = n < MIN_THRESHOLD_IMAGES
    if weak:
        line += (f": fewer than {MIN_THRESHOLD_IMAGES} images, the threshold is unreliable (it is the maximum or "
                 "near it of few scores); give more normal images with --validation or fit.holdout_fraction")
    elif stats["fpr_resolution"] > fpr:
        line += f": to resolve {fpr:.2%}, give at least {int(np.ceil(1 / fpr))} normal images"
    return line, weak


def quantiles(scores: np.ndarray) -> dict[str, float] | None:
    """p50 / p90 / p99 / max of image scores (None for no scores)."""
    s = np.asarray(scores, dtype=np.float64)
    if not len(s):
        return None
    return {"p50": float(np.percentile(s, 50)), "p90": float(np.percentile(s, 90)),
            "p99": float(np.percentile(s, 99)), "max": float(s.max())}


# Drift: warn when a run's share of images above the normal reference's p99 is at least DRIFT_FACTOR
# times what the reference predicts and beyond chance (p < DRIFT_P, see :func:`drift`).
DRIFT_FACTOR = 3.0
DRIFT_P = 1e-3


def betabinom_tail(k: int, n: int, a: float, b: float) -> float:
    """P(X >= k) for X ~ BetaBinomial(n, a, b): the sum of the tail's probabilities in log space.
    (scipy.stats.betabinom.sf gives the same; importing scipy.stats costs about a second of every
    score job's start-up, scipy.special a tenth of that.)"""
    from scipy.special import betaln, gammaln, logsumexp
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    j = np.arange(k, n + 1, dtype=np.float64)
    log_pmf = (gammaln(n + 1) - gammaln(j + 1) - gammaln(n - j + 1) + betaln(j + a, n - j + b) - betaln(a, b))
    return float(min(1.0, np.exp(logsumexp(log_pmf))))


def drift(scores: np.ndarray, normal_p99: float, reference_images: int, reference_above: int) -> dict:
    """Share of ``scores`` above the normal reference's p99 image score, against what the reference
    predicts; ``warning`` when it is far above.

    The reference is small (up to 128 held-out training images, or the validation images), so the
    chance q that a normal image exceeds its p99 is itself uncertain: with m reference images of which
    j lie above it, q ~ Beta(j + 1, m - j), and the count above it among n normal images is
    beta-binomial. The p-value of the run's count comes from that distribution (a plain binomial at
    1 % would flag most models fitted on a few dozen images).
    """
    s = np.asarray(scores, dtype=np.float64)
    n, above = len(s), int((s > normal_p99).sum())
    a, b = reference_above + 1, max(1, reference_images - reference_above)
    expected = a / (a + b)
    p = betabinom_tail(above, n, a, b)
    share = above / n if n else 0.0
    return {"reference_p99": float(normal_p99), "reference_images": int(reference_images), "above": above,
            "share_above": share, "expected": expected, "p_value": p,
            "warning": bool(share >= DRIFT_FACTOR * expected and p < DRIFT_P)}
