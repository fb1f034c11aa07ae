"""Greedy k-center coreset on real patch features."""
import numpy as np
import pytest
import torch

from patchcore_dist.core.coreset import (coreset_size, covering_radius, greedy_coreset, project, projection_matrix,
                                         two_round_coreset)
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


@pytest.mark.parametrize("seed,k", [(0, 200), (1, 2047), (3, 600)])
def test_pruned_traversal_selects_as_the_dense_loop(real_features, seed, k):
    """Same indices in the same order as the dense step, on real projected patch features."""
    x = project(real_features, projection_matrix(1024, 128, seed))
    pruned, d_pruned = greedy_coreset(x, k, seed=seed, return_distances=True)
    dense, d_dense = greedy_coreset(x, k, seed=seed, pruned=False, return_distances=True)
    assert torch.equal(pruned, dense)
    assert torch.equal(d_pruned, d_dense)  # bit-identical distances, not only the same argmax


@pytest.mark.parametrize("n,d,k,seed", [(3000, 128, 300, 0), (2957, 64, 1000, 1), (1000, 8, 999, 2),
                                         (640, 128, 640, 3)])
def test_pruned_traversal_on_random_features_with_ties(n, d, k, seed):
    """Random features with exact duplicates and a shifted, scaled copy (large norms, small
    distances: the float32 slack of the bound matters): the order, ties included, is the dense one."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    x[n // 2: n // 2 + n // 8] = x[: n // 8]  # duplicates: tied distances, ties go to the lowest index
    x[n - n // 10:] = x[n // 10: 2 * (n // 10)] * 1e-3 + 50.0
    for data in (x, x * 0.01 + 300.0):
        assert torch.equal(greedy_coreset(data, k, seed=seed), greedy_coreset(data, k, seed=seed, pruned=False))


def test_two_round_path_unchanged(real_features):
    """The two-round composition runs the same greedy in each round, so pruned and dense agree."""
    x = project(real_features, projection_matrix(1024, 128, 0))
    parts = [x[:700], x[700:1500], x[1500:]]
    import patchcore_dist.core.coreset as mod
    pruned = two_round_coreset(parts, 200, seed=4)
    original = mod.greedy_coreset
    try:
        mod.greedy_coreset = lambda *a, **kw: original(*a, **kw, pruned=False)
        dense = two_round_coreset(parts, 200, seed=4)
    finally:
        mod.greedy_coreset = original
    assert torch.equal(pruned, dense)


def test_sizes():
    assert coreset_size(1000, 1.0) == 1000
    assert coreset_size(1000, 0.001) == 1
    assert coreset_size(1000, 0.1, size=50) == 50
    assert coreset_size(10, 0.1, size=50) == 10
    assert projection_matrix(64, 128) is None
    with pytest.raises(ValueError):
        coreset_size(0, 0.1)
