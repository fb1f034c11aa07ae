"""Faults, injected deterministically: a worker process of a stage exits hard (``os._exit``, like a
killed process) on the job's N-th batch of that stage, once (``PATCHCORE_FAULT``, see pipeline/faults.py). Ray
restarts the actor or retries the task; the job's result must equal a run without the fault."""
import os

import numpy as np
import pytest

from patchcore_dist.artifacts.model import load_model
from patchcore_dist.artifacts.scores import read_scores
from patchcore_dist.config import load_config
from patchcore_dist.errors import JobError
from patchcore_dist.pipeline.faults import FAULT_ENV
from patchcore_dist.pipeline.fit import run_fit
from patchcore_dist.pipeline.score import run_score

from helpers import SMALL



@pytest.fixture(scope="module")
def clean_model(small_model):
    """A model fitted with SMALL and without faults: the reference."""
    return small_model


def test_fit_survives_a_dead_decode_task_and_a_dead_extract_actor(clean_model, category, tmp_path, monkeypatch):
    markers = tmp_path / "decode.taken", tmp_path / "extract.taken"
    # the extract actor dies on the 2nd batch after writing that batch's shard
    monkeypatch.setenv(FAULT_ENV, f"decode:1:{markers[0]};extract:2:{markers[1]}")
    model = str(tmp_path / "model")
    manifest = run_fit(category, model, load_config(None, SMALL))  # 14 images: 2 batches
    assert all(m.exists() for m in markers), "an injected fault did not happen"
    n_train = len(os.listdir(f"{category}/train/good"))
    assert manifest["training"]["used"] == n_train and manifest["training"]["errors"] == 0
    assert np.array_equal(load_model(model).bank, load_model(clean_model).bank)  # bit for bit
    # the dead batch's shard is gone: every shard on disk is one the manifest lists
    on_disk = {f"features/{n}" for n in os.listdir(os.path.join(model, "features"))}
    assert on_disk == {n for n in manifest["files"] if n.startswith("features/")}


def test_score_survives_dead_decode_score_and_render_workers(clean_model, category, tmp_path, monkeypatch):
    images = f"{category}/test/good"
    n = sum(len(f) for _, _, f in os.walk(images))
    over = SMALL + ["runtime.batch_size=1"]
    run_score(clean_model, images, str(tmp_path / "clean"), overrides=over)
    expected = {r["image"]: r["score"] for r in read_scores(str(tmp_path / "clean")).to_pylist()}
    markers = [tmp_path / f"{stage}.taken" for stage in ("decode", "score", "render")]
    monkeypatch.setenv(FAULT_ENV, ";".join(f"{m.stem}:{k}:{m}" for m, k in zip(markers, (2, 3, 2))))
    out = str(tmp_path / "out")
    summary = run_score(clean_model, images, out, overrides=over)
    assert all(m.exists() for m in markers), "an injected fault did not happen"
    rows = read_scores(out).to_pylist()
    assert summary["images"] == n and len(rows) == n and len({r["image"] for r in rows}) == n
    assert all(r["error"] is None and os.path.exists(r["heatmap"]) for r in rows)
    assert {r["image"]: r["score"] for r in rows} == expected


def test_a_malformed_fault_setting_is_refused(clean_model, category, tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "scoring:x")
    with pytest.raises(JobError, match=FAULT_ENV):
        run_score(clean_model, f"{category}/test/good", str(tmp_path / "o"), overrides=SMALL)
