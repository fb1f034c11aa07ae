"""Greedy k-center coreset on real patch features."""
import numpy as np
import pytest
import torch

from patchcore_dist.core.coreset import coreset_size, covering_radius, greedy_coreset, project, projection_matrix
from patchcore_dist.core.reference import greedy_coreset_reference
from patchcore_dist.core.embedding import patch_features
from patchcore_dist.core.preprocessing import normalize

from helpers import crops


@pytest.fixture(scope="module")
def real_features(lite0, category):
    import glob
    imgs = crops(sorted(glob.glob(f"{category}/train/good/*.png"))[:8])
    with torch.inference_mode():
        feats, _ = patch_features(lite0(normalize(torch.from_numpy(imgs))), 3, 1024, 1024)
    return feats  # 8 x 256 patches


def test_size_unique_and_deterministic(real_features):
    x = project(real_features, projection_matrix(1024, 128, 0))
    k = coreset_size(len(x), 0.1)
    assert k == int(np.ceil(len(x) * 0.1))
    a = greedy_coreset(x, k, seed=0)
    b = greedy_coreset(x, k, seed=0)
    assert len(a) == k and len(set(a.tolist())) == k
    assert torch.equal(a, b)
    assert not torch.equal(a, greedy_coreset(x, k, seed=1))


def test_covering_radius_beats_random_subsets(real_features):
    x = project(real_features, projection_matrix(1024, 128, 0))
    k = len(x) // 10
    sel = greedy_coreset(x, k)
    ours = covering_radius(real_features, sel)
    g = torch.Generator().manual_seed(0)
    randoms = [covering_radius(real_features, torch.randperm(len(x), generator=g)[:k]) for _ in range(5)]
    # Greedy k-center is a 2-approximation of the optimal radius; random subsets leave outliers uncovered.
    assert ours < min(randoms), (ours, randoms)


def test_same_selection_as_the_original_loop(real_features):
    x = project(real_features, projection_matrix(1024, 128, 0))
    k = 150
    ours, dist = greedy_coreset(x, k, return_distances=True)
    ref = greedy_coreset_reference(x, k)
    assert set(ours.tolist()) == set(ref.tolist())
    assert dist.max().item() == pytest.approx(covering_radius(x, ours), rel=1e-4)


def test_sizes():
    assert coreset_size(1000, 1.0) == 1000
    assert coreset_size(1000, 0.001) == 1
    assert coreset_size(1000, 0.1, size=50) == 50
    assert coreset_size(10, 0.1, size=50) == 10
    assert projection_matrix(64, 128) is None
    with pytest.raises(ValueError):
        coreset_size(0, 0.1)
