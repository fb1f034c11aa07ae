"""A NaN or infinite image score is an error row ("score is not finite (nan)"), counted as an error and
retried by the next run, never a null score that passes for a success."""
import os

import numpy as np

from helpers import SMALL
from patchcore_dist.artifacts.scores import read_scores
from patchcore_dist.core.patchcore import PatchCore
from patchcore_dist.pipeline.score import run_score

LOCAL = SMALL + ["runtime.executor=local"]


def test_non_finite_scores_are_errors_and_retried(small_model, category, tmp_path, monkeypatch):
    images = os.path.join(category, "test", "good")
    names = sorted(os.listdir(images))
    predict = PatchCore.predict

    def broken(self, crops, *args, **kwargs):  # the first two images of each batch: NaN and +inf
        pred = predict(self, crops, *args, **kwargs)
        pred.image_scores[:2] = [np.nan, np.inf][:len(pred.image_scores)]
        return pred
    monkeypatch.setattr(PatchCore, "predict", broken)
    out = str(tmp_path / "out")
    summary = run_score(small_model, images, out, overrides=LOCAL + ["runtime.batch_size=64"])
    rows = {os.path.basename(r["image"]): r for r in read_scores(out).to_pylist()}
    assert summary["errors"] == 2 and len(rows) == len(names)
    bad = sorted(r["error"] for r in rows.values() if r["error"])
    assert bad == ["score is not finite (inf)", "score is not finite (nan)"]
    assert all(r["score"] is None for r in rows.values() if r["error"])
    assert all(np.isfinite(r["score"]) for r in rows.values() if not r["error"])

    monkeypatch.setattr(PatchCore, "predict", predict)
    again = run_score(small_model, images, out, overrides=LOCAL)
    assert again["scored"] == 2 and again["errors"] == 0  # the two error rows retried, the rest unchanged
    rows = read_scores(out).to_pylist()
    assert len(rows) == len(names) and all(r["error"] is None and np.isfinite(r["score"]) for r in rows)
