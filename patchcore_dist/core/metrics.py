"""Detection metrics: image AUROC, pixel AUROC, PRO (per-region overlap), F1-optimal threshold.

AUROCs and the precision-recall curve come from scikit-learn. PRO is not in scikit-learn; it is
computed here exactly (no threshold grid): sort all pixel scores once; lowering the threshold past
a pixel adds 1/|region| / R to PRO if it lies in a ground-truth region (R regions in all), or
1/|normal pixels| to the false-positive rate if it is normal. The PRO curve over FPR in [0, limit]
is integrated with the trapezoid rule and divided by the limit (MVTec AD's definition, limit 0.3).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score


def image_auroc(labels, scores) -> float:
    labels = np.asarray(labels)
    if labels.min() == labels.max():
        return float("nan")
    return float(roc_auc_score(labels, scores))


def pixel_auroc(masks: list[np.ndarray], maps: list[np.ndarray]) -> float:
    y = np.concatenate([m.ravel() for m in masks]).astype(bool)
    s = np.concatenate([a.ravel() for a in maps]).astype(np.float32)
    if y.all() or not y.any():
        return float("nan")
    return float(roc_auc_score(y, s))


def pro_curve(masks: list[np.ndarray], maps: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, pro) at every distinct threshold, from the highest score down; starts at (0, 0)."""
    scores, weights_pro, weights_fpr = [], [], []
    regions = 0
    sizes = []
    for m, a in zip(masks, maps):
        m = np.asarray(m, bool)
        lab, n = ndimage.label(m, structure=np.ones((3, 3)))  # 8-connected regions
        size = np.bincount(lab.ravel())
        w = np.zeros(lab.shape, np.float64)
        if n:
            w[m] = 1.0 / size[lab[m]]
        regions += n
        sizes.append(size[1:])
        scores.append(np.asarray(a, np.float64).ravel())
        weights_pro.append(w.ravel())
        weights_fpr.append((~m).ravel().astype(np.float64))
    s = np.concatenate(scores)
    wp = np.concatenate(weights_pro)
    wf = np.concatenate(weights_fpr)
    if regions == 0 or wf.sum() == 0:
        raise ValueError("PRO needs at least one defect region and one normal pixel")
    order = np.argsort(-s, kind="stable")
    s, wp, wf = s[order], wp[order], wf[order]
    pro = np.cumsum(wp) / regions
    fpr = np.cumsum(wf) / wf.sum()
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # the end of each group of equal scores
    return np.r_[0.0, fpr[last]], np.r_[0.0, pro[last]]


def pro_score(masks: list[np.ndarray], maps: list[np.ndarray], fpr_limit: float = 0.3) -> float:
    """Normalised area under the PRO curve for FPR in [0, fpr_limit]."""
    fpr, pro = pro_curve(masks, maps)
    return _pro_area(fpr, pro, fpr_limit)


class PixelHistogram:
    """Pixel AUROC and PRO over a stream of (mask, anomaly map) pairs, with memory independent of the
    number of images: each pair is reduced to histograms over ``bins`` equal score bins in [lo, hi]
    (normal pixels, defect pixels, and defect pixels weighted 1 / their region's size) and dropped.
    The metrics are those of :func:`pixel_auroc` and :func:`pro_score` on the scores rounded to their
    bin (scores in one bin are ties): with the default 2^16 bins over the range of the maps, they agree
    to about 1e-4. Histograms add (``a + b``) to combine groups of images."""

    def __init__(self, lo: float, hi: float, bins: int = 65536):
        self.lo, self.hi, self.bins = float(lo), float(hi) if hi > lo else float(lo) + 1.0, bins
        self.normal = np.zeros(bins, np.float64)
        self.defect = np.zeros(bins, np.float64)
        self.region_weight = np.zeros(bins, np.float64)
        self.regions = 0

    def add(self, mask: np.ndarray, amap: np.ndarray) -> "PixelHistogram":
        mask = np.asarray(mask, bool)
        idx = np.clip(((np.asarray(amap, np.float64) - self.lo) / (self.hi - self.lo) * self.bins).astype(np.int64),
                      0, self.bins - 1)
        lab, n = ndimage.label(mask, structure=np.ones((3, 3)))  # 8-connected regions
        self.normal += np.bincount(idx[~mask], minlength=self.bins)
        self.defect += np.bincount(idx[mask], minlength=self.bins)
        if n:
            size = np.bincount(lab.ravel())
            self.region_weight += np.bincount(idx[mask], weights=1.0 / size[lab[mask]], minlength=self.bins)
        self.regions += n
        return self

    def __add__(self, other: "PixelHistogram") -> "PixelHistogram":
        out = PixelHistogram(self.lo, self.hi, self.bins)
        for k in ("normal", "defect", "region_weight"):
            setattr(out, k, getattr(self, k) + getattr(other, k))
        out.regions = self.regions + other.regions
        return out

    def auroc(self) -> float:
        neg, pos = self.normal[::-1], self.defect[::-1]  # from the highest score down
        if neg.sum() == 0 or pos.sum() == 0:
            return float("nan")
        fpr = np.r_[0.0, np.cumsum(neg) / neg.sum()]
        tpr = np.r_[0.0, np.cumsum(pos) / pos.sum()]
        return float(np.trapezoid(tpr, fpr))

    def pro(self, fpr_limit: float = 0.3) -> float:
        if self.regions == 0 or self.normal.sum() == 0:
            return float("nan")
        fpr = np.r_[0.0, np.cumsum(self.normal[::-1]) / self.normal.sum()]
        pro = np.r_[0.0, np.cumsum(self.region_weight[::-1]) / self.regions]
        return _pro_area(fpr, pro, fpr_limit)


def _pro_area(fpr: np.ndarray, pro: np.ndarray, fpr_limit: float) -> float:
    """Normalised area under a PRO curve (increasing fpr) for FPR in [0, fpr_limit]."""
    keep = fpr <= fpr_limit
    x, y = fpr[keep], pro[keep]
    if x[-1] < fpr_limit and keep.sum() < len(fpr):
        j = keep.sum()  # interpolate the curve at the limit
        t = (fpr_limit - fpr[j - 1]) / (fpr[j] - fpr[j - 1])
        x = np.r_[x, fpr_limit]
        y = np.r_[y, pro[j - 1] + t * (pro[j] - pro[j - 1])]
    return float(np.trapezoid(y, x) / fpr_limit)


def f1_threshold(labels, scores) -> tuple[float, float]:
    """The image-score threshold that maximises F1, and that F1. The same rule as ``is_anomaly``
    (score > threshold is anomalous): the threshold lies midway between the lowest score the F1-optimal
    cut calls anomalous and the highest score below it (just below that score when none is lower)."""
    p, r, t = precision_recall_curve(labels, scores)
    f1 = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-12), 0)[:-1]
    i = int(np.argmax(f1))
    s = np.asarray(scores, dtype=np.float64)
    lower = s[s < t[i]]
    cut = (t[i] + lower.max()) / 2 if len(lower) else np.nextafter(t[i], -np.inf)
    return float(cut), float(f1[i])
