"""Metrics against hand-computed cases and scikit-learn."""
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from patchcore_dist.core.metrics import f1_threshold, image_auroc, pixel_auroc, pro_curve, pro_score


def test_pro_single_region_by_hand():
    mask = np.array([[1, 1, 0, 0], [0, 0, 0, 0]], bool)
    amap = np.array([[0.9, 0.5, 0.8, 0.1], [0.2, 0.3, 0.4, 0.6]])
    # descending: .9 region (PRO .5), .8 .6 normal (FPR 1/6, 2/6), .5 region (PRO 1) ...
    assert pro_score([mask], [amap], 0.3) == pytest.approx(0.5)
    assert pro_score([mask], [amap], 0.5) == pytest.approx((0.5 * 2 / 6 + 1 * 1 / 6) / 0.5)
    fpr, pro = pro_curve([mask], [amap])
    assert fpr[-1] == pytest.approx(1.0) and pro[-1] == pytest.approx(1.0)


def test_pro_averages_regions_not_pixels():
    mask = np.array([[1, 0, 1, 1, 1, 0]], bool)  # regions of 1 and 3 pixels
    amap = np.array([[0.9, 0.5, 0.1, 0.2, 0.3, 0.05]])
    # up to FPR 0.3 only the 1-pixel region is found: PRO 0.5 (a pixel-wise overlap would say 0.25)
    assert pro_score([mask], [amap], 0.3) == pytest.approx(0.5)


def test_pro_over_several_images_and_ties():
    m1 = np.zeros((4, 4), bool)
    m1[1:3, 1:3] = True
    m2 = np.zeros((4, 4), bool)
    perfect = [m1.astype(float), m2.astype(float)]
    assert pro_score([m1, m2], perfect) == pytest.approx(1.0)
    flat = [np.ones((4, 4)), np.ones((4, 4))]  # all tied: one step from (0,0) to (1,1)
    assert pro_score([m1, m2], flat) == pytest.approx(0.15)
    with pytest.raises(ValueError):
        pro_score([m2], [np.ones((4, 4))])


def test_aurocs_equal_scikit_learn():
    rng = np.random.default_rng(0)
    masks = [rng.random((8, 8)) > 0.8 for _ in range(3)]
    maps = [m * 0.5 + rng.random((8, 8)) for m in masks]
    y = np.concatenate([m.ravel() for m in masks])
    s = np.concatenate([a.ravel() for a in maps])
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(y, s))
    assert image_auroc([0, 1, 0, 1], [0.1, 0.9, 0.3, 0.2]) == pytest.approx(0.75)
    assert np.isnan(image_auroc([1, 1], [0.1, 0.2]))


def test_f1_threshold_by_hand():
    scores = [0.1, 0.4, 0.35, 0.8]
    t, f1 = f1_threshold([0, 0, 1, 1], scores)
    # the best cut flags 0.35, 0.4 and 0.8 (P 2/3, R 1); with is_anomaly's rule (score > t) t lies midway
    # below the lowest flagged score, so the image at 0.35 is flagged as the F1 says, not "missed"
    assert t == pytest.approx((0.1 + 0.35) / 2) and f1 == pytest.approx(0.8)
    assert [s > t for s in scores] == [False, True, True, True]
    t, _ = f1_threshold([1, 1, 0], [0.5, 0.9, 0.2])
    assert 0.2 < t < 0.5


def test_streamed_pixel_metrics_equal_the_exact_ones():
    """PixelHistogram (what evaluate uses: one image at a time, memory independent of the test set)
    agrees with the exact pixel AUROC and PRO; groups add."""
    from patchcore_dist.core.metrics import PixelHistogram
    rng = np.random.default_rng(1)
    masks, maps = [], []
    for i in range(8):
        m = np.zeros((48, 64), bool)
        if i % 2:
            m[5 + i:20 + i, 10:30] = True
            m[35:40, 40 + i:50 + i] = True
        masks.append(m)
        maps.append(m * 0.5 + rng.random((48, 64)))
    lo, hi = min(a.min() for a in maps), max(a.max() for a in maps)
    parts = [PixelHistogram(lo, hi).add(m, a) for m, a in zip(masks, maps)]
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    assert total.auroc() == pytest.approx(pixel_auroc(masks, maps), abs=1e-4)
    assert total.pro() == pytest.approx(pro_score(masks, maps), abs=1e-4)
    assert np.isnan(PixelHistogram(0, 1).add(np.zeros((4, 4), bool), np.ones((4, 4))).pro())
    assert np.isnan(PixelHistogram(0, 1).add(np.zeros((4, 4), bool), np.ones((4, 4))).auroc())
