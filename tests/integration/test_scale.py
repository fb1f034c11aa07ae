"""Scale: the two-round (composable) coreset, approximate nearest-neighbour indexes."""
import glob

import pytest
import torch

from patchcore_dist.config import load_config
from patchcore_dist.core.coreset import covering_radius, greedy_coreset, project, projection_matrix, two_round_coreset
from patchcore_dist.core.embedding import patch_features
from patchcore_dist.pipeline.fit import run_fit
from patchcore_dist.core.index import build_index
from patchcore_dist.core.memory_bank import MemoryBank
from patchcore_dist.artifacts.model import load_model
from patchcore_dist.core.preprocessing import normalize
from patchcore_dist.artifacts.scores import read_scores
from patchcore_dist.pipeline.score import run_score

from helpers import SMALL, crops


@pytest.fixture(scope="module")
def feats(lite0, category):
    imgs = crops(sorted(glob.glob(f"{category}/train/good/*.png"))[:12])
    with torch.inference_mode():
        f, _ = patch_features(lite0(normalize(torch.from_numpy(imgs))), 3, 1024, 1024)
    return f


def test_two_round_coreset_covers_almost_as_well(feats):
    x = project(feats, projection_matrix(1024, 128, 0))
    k = len(x) // 20
    parts = list(torch.tensor_split(x, 4))
    two = two_round_coreset(parts, k, oversample=4.0)  # every part keeps k: the 4-approximation regime
    assert len(two) == k and len(set(two.tolist())) == k
    single = greedy_coreset(x, k)
    r1, r2 = covering_radius(x, single), covering_radius(x, two)
    assert r2 <= 2.0 * r1, (r1, r2)  # guarantee: <= 4 x optimal <= 4 x r1; in practice close
    rnd = covering_radius(x, torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:k])
    assert r2 < rnd


@pytest.mark.parametrize("kind, floor", [("ivf_flat", 0.9), ("hnsw", 0.95), ("ivf_pq", 0.3)])
def test_approximate_indexes_recall(feats, kind, floor):
    bank = feats[::3].numpy()
    queries = feats[1::7]
    cfg = load_config(None, [f"index.type={kind}", "index.nprobe=32"]).index
    exact_d, exact_i = MemoryBank(bank).search(queries, 1)
    mb = MemoryBank(bank, index=build_index(bank, cfg))
    d, i = mb.search(queries, 1)
    recall = float((i[:, 0] == exact_i[:, 0]).float().mean())
    assert recall >= floor, recall
    if kind != "ivf_pq":  # exact vectors: an approximate hit is never closer than the true nearest
        assert torch.all(d[:, 0] >= exact_d[:, 0] - 0.5)  # flat L2 via norms carries ~0.2 of rounding


def test_distributed_fit_and_approximate_index_end_to_end(ray_local, category, tmp_path):
    model = str(tmp_path / "m")
    cfg = load_config(None, SMALL + ["coreset.method=two_round", "coreset.parts=2", "index.type=hnsw"])
    manifest = run_fit(category, model, cfg)
    assert manifest["stats"]["coreset"]["method"] == "two_round" and manifest["stats"]["coreset"]["parts"] == 2
    assert manifest["stats"]["index"] == "IndexHNSWFlat"
    assert type(load_model(model).index).__name__ == "IndexHNSWFlat"
    out = str(tmp_path / "o")
    run_score(model, f"{category}/test", out, overrides=SMALL)
    rows = read_scores(out).to_pylist()
    from sklearn.metrics import roc_auc_score
    labels = [0 if "/good/" in r["image"] else 1 for r in rows]
    assert roc_auc_score(labels, [r["score"] for r in rows]) >= 0.9
