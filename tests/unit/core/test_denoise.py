"""Per-cell training-patch outlier scores (core/denoise.py) on real patch features of real images."""
import glob

import numpy as np
import pytest
import torch

from patchcore_dist.core import denoise
from patchcore_dist.core.coreset import project, projection_matrix
from patchcore_dist.core.embedding import patch_features
from patchcore_dist.core.preprocessing import normalize
from patchcore_dist.synthetic.defects import inject

from helpers import crops


@pytest.fixture(scope="module")
def projected(lite0, category):
    """12 brick images (the last two with an injected stain) -> projected patch features [12, 256, 128] and
    the defect masks of the two at the 16 x 16 feature grid."""
    imgs = crops(sorted(glob.glob(f"{category}/train/good/*.png"))[:12]).copy()
    rng = np.random.default_rng(3)
    masks = np.zeros((12, 16, 16), bool)
    for i in (10, 11):
        imgs[i], m = inject(imgs[i], "stain", rng)
        masks[i] = m.reshape(16, 8, 16, 8).mean((1, 3)) > 0.5
    with torch.inference_mode():
        feats, grid = patch_features(lite0(normalize(torch.from_numpy(imgs))), 3, 1024, 1024)
    x = project(feats, projection_matrix(1024, 128, 0)).view(12, -1, 128)
    return x, tuple(grid), masks.reshape(12, -1)


def _brute(x: np.ndarray, nbr: np.ndarray, a: int, c: int, k: int) -> np.ndarray:
    """The k nearest other images, each at its closest patch within the window, by exhaustive search."""
    best = [min(np.linalg.norm(x[b, j] - x[a, c]) for j in nbr[c] if j >= 0) for b in range(len(x)) if b != a]
    return np.sort(best)[:k]


@pytest.mark.parametrize("radius", [0, 1, 4])
def test_chunked_knn_is_exact(projected, radius):
    """Tiny budgets (one cell, one query image per block) give the exhaustive search's distances."""
    x, grid, _ = projected
    d_small, i_small = denoise.knn_per_cell(x, grid, 4, radius, budget_bytes=1)
    d_big, i_big = denoise.knn_per_cell(x, grid, 4, radius)
    assert torch.allclose(d_small, d_big, atol=1e-3)
    assert not (i_big == torch.arange(len(x))[:, None, None]).any()  # never the image itself
    nbr = denoise.window(grid, radius)
    for a, c in ((0, 0), (5, 17), (11, 255)):
        np.testing.assert_allclose(d_big[a, c].numpy(), _brute(x.numpy(), nbr, a, c, 4), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("method, radius", [("knn", 0), ("knn", 4), ("lof", 0)])
def test_defect_patches_score_highest(projected, method, radius):
    """The injected stains' cells are far above the clean patches: the top 2 % of all patches are mostly
    defect cells, and the two defective images have the highest image scores."""
    x, grid, masks = projected
    s = denoise.patch_outlier_scores(x, grid, 5, method, radius)
    assert s.shape == masks.shape and np.median(s) == pytest.approx(1.0, abs=0.15)
    dropped = denoise.drop_top(s, 0.02)
    assert dropped.sum() == int(0.02 * s.size)
    assert (dropped & masks).sum() / masks.sum() > 0.5
    image, share = denoise.image_outliers(s, dropped)
    assert set(np.argsort(-image)[:2]) == {10, 11} and share[10] > share[:10].max()


def test_drop_top_partitions_without_quantile():
    """More elements than torch.quantile takes (2^24): np.partition-based, exact count."""
    s = np.random.default_rng(0).random(2 ** 24 + 5, dtype=np.float32)
    m = denoise.drop_top(s, 0.15)
    assert m.sum() == int(np.floor(0.15 * s.size)) and s[m].min() >= s[~m].max()
    assert not denoise.drop_top(s[:10], 0.05).any()


def test_one_image_has_nothing_to_compare_with(projected):
    x, grid, _ = projected
    assert not denoise.patch_outlier_scores(x[:1], grid).any()
    with pytest.raises(ValueError, match="radius"):
        denoise.patch_outlier_scores(x, grid, method="lof", radius=1)


def test_window_is_clipped_at_the_border():
    w = denoise.window((3, 4), 1)
    assert w.shape == (12, 9) and (w[:, 0] == np.arange(12)).all()
    assert (w[0] >= 0).sum() == 4 and (w[5] >= 0).sum() == 9


def test_a_sample_of_reference_images_is_searched_exactly(projected):
    """max_references: each image against a sample of the others (itself excluded when sampled), exact
    within it; a sample as large as the other images is the full search."""
    x, grid, masks = projected
    refs = np.array([0, 3, 5, 10, 11])
    d, i = denoise.knn_per_cell(x, grid, 3, 1, references=refs)
    assert set(np.unique(i.numpy())) <= set(refs.tolist())
    assert not (i == torch.arange(len(x))[:, None, None]).any()
    nbr, xn = denoise.window(grid, 1), x.numpy()
    for a, c in ((3, 40), (7, 100)):
        best = sorted(min(np.linalg.norm(xn[b, j] - xn[a, c]) for j in nbr[c] if j >= 0) for b in refs if b != a)
        np.testing.assert_allclose(d[a, c].numpy(), best[:3], rtol=1e-4, atol=1e-3)
    full = denoise.patch_outlier_scores(x, grid, 5, "knn", 1)
    assert np.array_equal(full, denoise.patch_outlier_scores(x, grid, 5, "knn", 1, max_references=11))
    sampled = denoise.patch_outlier_scores(x, grid, 5, "knn", 1, max_references=8, seed=1)
    assert set(np.argsort(-sampled.max(1))[:2]) == {10, 11}
