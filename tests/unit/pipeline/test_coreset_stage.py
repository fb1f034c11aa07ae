"""The fit's coreset stage: with denoise off, the training-outlier scores are computed on a thread
beside the greedy coreset; the selection and the scores equal those of running them one after the
other (the model does not change)."""
import threading

import numpy as np
import torch

from patchcore_dist.config import load_config
from patchcore_dist.core import coreset as greedy
from patchcore_dist.pipeline import coreset as stage


def test_outliers_beside_the_coreset_equal_the_sequential_ones(monkeypatch):
    cfg = load_config()
    assert not cfg.denoise.enabled  # the default: the scores decide nothing in the model
    rng = np.random.default_rng(0)
    projected = torch.from_numpy(rng.standard_normal((3 * 10 * 16, 32)).astype(np.float32))
    layout = [(f"shard-{j}", 10, 16) for j in range(3)]  # 30 images of 4 x 4 cells
    monkeypatch.setattr(stage, "project_shards", lambda uris, matrix, opts: (projected, layout))
    threads = []
    real = stage.outlier_scores

    def recorded(*args):
        threads.append(threading.current_thread())
        return real(*args)
    monkeypatch.setattr(stage, "outlier_scores", recorded)
    selected, got_layout, info, outliers = stage.select_coreset([u for u, _, _ in layout], [160] * 3, cfg, {})
    assert threads and threads[0] is not threading.main_thread()  # computed beside the coreset
    k = greedy.coreset_size(len(projected), cfg.coreset.ratio, cfg.coreset.size)
    expected = greedy.select(projected, k, cfg.seed, cfg.coreset.num_starting_points, cfg.coreset.device).numpy()
    assert got_layout == layout and info["k"] == k and info["denoised"] == 0 and "denoise_seconds" in info
    assert np.array_equal(selected, expected)
    sequential = real(projected, layout, cfg)
    assert outliers["keep"] is None
    for key in ("image_score", "dropped_fraction"):
        assert np.array_equal(outliers[key], sequential[key]), key
