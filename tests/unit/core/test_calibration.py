"""Score statistics, the heatmap scale and the drift check."""
import numpy as np
import pytest

from patchcore_dist.core import calibration


def test_peak_normalised_map_reads_the_image_score():
    m = np.array([[1.0, 2.0], [4.0, 3.0]], np.float32)
    out = calibration.peak_normalised(m, 10.0)
    assert out.max() == pytest.approx(10.0) and out[0, 0] == pytest.approx(2.5)  # shape kept
    assert calibration.peak_normalised(np.zeros((2, 2), np.float32), 5.0).max() == 0  # nothing to scale


def test_threshold_sits_at_the_centre_of_the_scale():
    lo, hi = calibration.heatmap_scale(cold=100.0, threshold=150.0)
    assert (lo, hi) == (100.0, 200.0)
    assert (150.0 - lo) / (hi - lo) == calibration.THRESHOLD_LEVEL


def test_normal_reference_from_maps_and_scores():
    rng = np.random.default_rng(0)
    maps = [rng.uniform(0, 1, (8, 8)).astype(np.float32) for _ in range(5)]
    scores = np.array([10.0, 11, 12, 13, 14])
    ref = calibration.normal_reference(scores, maps)
    assert ref["images"] == 5 and ref["max"] == 14 and ref["p50"] == 12
    assert 0 < ref["cold"] < 14  # the median pixel of maps whose peaks read 10..14


def test_threshold_at_fpr():
    scores = np.arange(100, dtype=float)
    assert calibration.threshold_at_fpr(scores, 0.05) == 94  # 5 of 100 above it
    assert calibration.threshold_at_fpr(scores, 0.0) == 99


def test_drift_warns_only_far_above_the_normal_share():
    rng = np.random.default_rng(1)
    normal = rng.normal(100, 5, 2000)
    p99 = float(np.percentile(normal, 99))
    ref = dict(reference_images=2000, reference_above=int((normal > p99).sum()))
    assert not calibration.drift(rng.normal(100, 5, 500), p99, **ref)["warning"]
    shifted = calibration.drift(rng.normal(110, 5, 500), p99, **ref)
    assert shifted["warning"] and shifted["share_above"] > 0.2
    assert not calibration.drift(np.array([]), p99, **ref)["warning"]


def test_drift_accounts_for_a_small_reference():
    """With 20 reference images the p99 is a noisy estimate: normal runs must not warn for most models
    (a binomial test at 1 % warned for about 60 % of such models)."""
    rng = np.random.default_rng(2)
    warnings = 0
    for _ in range(100):
        ref = rng.normal(100, 5, 20)
        p99 = float(np.percentile(ref, 99))
        run = rng.normal(100, 5, 300)
        warnings += calibration.drift(run, p99, 20, int((ref > p99).sum()))["warning"]
    assert warnings <= 2
    ref = rng.normal(100, 5, 20)
    p99 = float(np.percentile(ref, 99))
    assert calibration.drift(rng.normal(115, 5, 300), p99, 20, int((ref > p99).sum()))["warning"]


@pytest.mark.parametrize("n,a,b", [(8, 1, 127), (100, 2, 27), (1000, 5, 127), (20000, 1, 20)])
def test_betabinom_tail_equals_scipy_stats(n, a, b):
    from scipy.stats import betabinom
    for k in sorted({0, 1, 2, n // 50, n // 10, n // 3, n, n + 1}):
        expected = float(betabinom.sf(k - 1, n, a, b))
        # scipy's sf is 1 - cdf: its error near zero is ~1e-13; the tail sum stays exact there
        assert calibration.betabinom_tail(k, n, a, b) == pytest.approx(expected, rel=1e-6, abs=1e-12), k
    assert calibration.betabinom_tail(0, n, a, b) == 1.0 and calibration.betabinom_tail(n + 1, n, a, b) == 0.0


def test_a_threshold_from_few_images_is_called_unreliable():
    """Under MIN_THRESHOLD_IMAGES normal images the fit's sentence says the threshold is unreliable and
    how to fix it; from enough images it says which FPR they resolve, and is not weak."""
    rng = np.random.default_rng(0)
    few = calibration.calibration_stats(rng.normal(3, 0.2, calibration.MIN_THRESHOLD_IMAGES - 1), 0.01, "normal images")
    line, weak = calibration.describe_threshold(few)
    assert weak and "unreliable" in line and "--validation" in line
    assert few["threshold_images"] == calibration.MIN_THRESHOLD_IMAGES - 1
    enough = calibration.calibration_stats(rng.normal(3, 0.2, 200), 0.01, "normal images")
    line, weak = calibration.describe_threshold(enough)
    assert not weak and "unreliable" not in line and "200 images resolve FPRs down to 0.5%" in line
    assert enough["calibration_fpr"] <= 0.01
