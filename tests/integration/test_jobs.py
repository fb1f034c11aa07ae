"""End-to-end fit + score on one local Ray instance: local folders, s3:// through a loopback S3 server,
and `ray job submit` to a `ray start --head` cluster."""
import io
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from patchcore_dist.artifacts import storage
from patchcore_dist.config import load_config
from patchcore_dist.errors import JobError
from patchcore_dist.pipeline.fit import run_fit
from patchcore_dist.errors import ModelError
from patchcore_dist.artifacts.model import load_model
from patchcore_dist.artifacts.scores import read_scores
from patchcore_dist.pipeline.score import run_score

from helpers import ROOT, SMALL



def _check_scores(table, n_images, opts=None):
    rows = table.to_pylist()
    assert len(rows) == n_images
    assert len({r["image"] for r in rows}) == n_images
    ok = [r for r in rows if r["error"] is None]
    for r in ok:
        png = Image.open(io.BytesIO(storage.read_bytes(r["heatmap"], **(opts or {}))))
        assert png.size == (r["width"], r["height"])
    labels = [0 if "/good/" in r["image"] else 1 for r in ok]
    return roc_auc_score(labels, [r["score"] for r in ok])


@pytest.fixture(scope="module")
def local_model(ray_local, category, tmp_path_factory):
    model = str(tmp_path_factory.mktemp("models") / "brick")
    manifest = run_fit(category, model, load_config(None, SMALL))  # an MVTec root: fits on train/good
    return model, manifest


def test_fit_writes_a_verified_model(local_model, category):
    model, manifest = local_model
    n_train = len(os.listdir(f"{category}/train/good"))
    assert manifest["training"]["images"] == n_train and manifest["training"]["errors"] == 0
    m = load_model(model)
    patches = n_train * 16 * 16
    assert m.bank.shape == (int(np.ceil(patches * 0.1)), 1024) == (manifest["bank"]["rows"], manifest["bank"]["dim"])
    shards = pq.read_table(os.path.join(model, "features")).to_pylist()
    assert len(shards) == n_train
    assert {r["grid_h"] for r in shards} == {16} and len(shards[0]["features"]) == 256 * 1024
    for name, entry in manifest["files"].items():
        assert os.path.getsize(os.path.join(model, name)) == entry["bytes"]
    with pytest.raises(JobError, match="never changed in place"):
        run_fit(category, model, load_config(None, SMALL))


def test_fit_is_reproducible(local_model, category, tmp_path):
    """Same images, same config: the same memory bank, bit for bit (batches, patch order, coreset)."""
    model, _ = local_model
    again = str(tmp_path / "again")
    run_fit(category, again, load_config(None, SMALL))
    assert np.array_equal(load_model(model).bank, load_model(again).bank)


def test_score_local_folders(local_model, category, tmp_path):
    model, manifest = local_model
    out = str(tmp_path / "out")
    summary = run_score(model, f"{category}/test", out, overrides=SMALL)
    n = sum(len(f) for _, _, f in os.walk(f"{category}/test"))
    assert summary["images"] == n and summary["errors"] == 0
    table = read_scores(out)
    assert set(table.column("model").to_pylist()) == {manifest["model_digest"]}
    assert _check_scores(table, n) >= 0.9
    # heatmaps mirror the input's relative paths, with an overlay beside each
    first = sorted(os.listdir(f"{category}/test/good"))[0]  # heatmaps keep the input's name and extension
    assert os.path.exists(os.path.join(out, "heatmaps", manifest["model_digest"], "good", first + ".png"))
    assert os.path.exists(os.path.join(out, "heatmaps", manifest["model_digest"], "good", first + "_overlay.jpg"))


def test_overlay_is_drawn_from_the_bytes_read_once(category, tmp_path):
    """The decode task passes the file's bytes on to the renderer: no second read of the archive
    (here the file is gone before rendering), and the bytes do not travel past the renderer."""
    from patchcore_dist.pipeline.stages import decode_batch, render_batch
    src = sorted(os.listdir(f"{category}/test/good"))[0]
    path = tmp_path / src
    path.write_bytes(open(f"{category}/test/good/{src}", "rb").read())
    original = np.asarray(Image.open(path).convert("RGB"))
    cfg = load_config(None, SMALL).to_dict()
    batch = decode_batch({"uri": np.array([str(path)], object), "rel": np.array([src], object)}, cfg,
                         keep_bytes=True)
    assert len(batch["data"][0]) == path.stat().st_size
    path.unlink()
    grid = np.tile(np.linspace(0, 1, 16, dtype=np.float32), 16)[None]  # every row a left-to-right ramp
    out = render_batch(dict(batch, patch_scores=grid, grid_h=np.array([16]), grid_w=np.array([16]),
                            score=np.array([1.0])), cfg, str(tmp_path / "heat"), (0.0, 1.0))
    assert "data" not in out and not out["error"][0]
    over = np.asarray(Image.open(tmp_path / "heat" / (src + "_overlay.jpg")), np.float32)
    assert over.shape == original.shape
    # the photograph shows through where the heat is low (alpha 0.1 on the left edge)
    left = over[:, :4].mean(2).ravel(), original[:, :4].astype(np.float32).mean(2).ravel()
    assert np.corrcoef(*left)[0, 1] > 0.8


def test_bad_files_become_error_rows(local_model, category, tmp_path):
    model, _ = local_model
    imgs = tmp_path / "mixed"
    imgs.mkdir()
    good = sorted(os.listdir(f"{category}/test/good"))[:2]
    for g in good:
        (imgs / g).write_bytes(open(f"{category}/test/good/{g}", "rb").read())
    (imgs / "empty.png").write_bytes(b"")
    (imgs / "text.jpg").write_text("not an image")
    data = open(f"{category}/test/good/{good[0]}", "rb").read()
    (imgs / "truncated.png").write_bytes(data[: len(data) // 3])
    out = str(tmp_path / "out")
    summary = run_score(model, str(imgs), out, overrides=SMALL)
    rows = {os.path.basename(r["image"]): r for r in read_scores(out).to_pylist()}
    assert len(rows) == 5 and summary["errors"] == 3
    assert "empty" in rows["empty.png"]["error"] and rows["empty.png"]["score"] is None
    assert "not a recognised image" in rows["text.jpg"]["error"]
    assert rows["truncated.png"]["error"]
    assert all(rows[g]["error"] is None and rows[g]["score"] > 0 for g in good)


def test_clear_errors_before_work(local_model, tmp_path):
    model, _ = local_model
    (tmp_path / "empty").mkdir()
    with pytest.raises(JobError, match="no images"):
        run_score(model, str(tmp_path / "empty"), str(tmp_path / "o"), overrides=SMALL)
    with pytest.raises(JobError, match="not found"):
        run_score(model, str(tmp_path / "missing"), str(tmp_path / "o"), overrides=SMALL)
    with pytest.raises(JobError, match="incompatible config.*image.crop"):
        run_score(model, str(tmp_path), str(tmp_path / "o"), overrides=["image.crop=96"])
    with pytest.raises(JobError, match="model not found"):
        run_score(str(tmp_path / "nomodel"), str(tmp_path), str(tmp_path / "o"))


def test_corrupt_model_is_refused(local_model, tmp_path):
    import shutil
    model, _ = local_model
    bad = tmp_path / "copy"
    shutil.copytree(model, bad)
    arr = np.load(bad / "memory_bank.npy")
    arr[0, 0] += 1
    np.save(bad / "memory_bank.npy", arr)
    with pytest.raises(ModelError, match="sha256"):
        load_model(str(bad))
    shutil.copy(os.path.join(model, "memory_bank.npy"), bad / "memory_bank.npy")
    load_model(str(bad))  # intact again
    os.remove(bad / "index.faiss")
    with pytest.raises(ModelError, match="index.faiss is missing"):
        load_model(str(bad))
    os.remove(bad / "manifest.json")
    with pytest.raises(ModelError, match="never committed"):
        load_model(str(bad))


def _upload(local_dir, uri, opts):
    for dirpath, _, files in os.walk(local_dir):
        for f in files:
            rel = os.path.relpath(os.path.join(dirpath, f), local_dir)
            storage.write_bytes(storage.join(uri, rel), open(os.path.join(dirpath, f), "rb").read(), **opts)


def test_fit_and_score_on_s3(ray_local, category, s3, bucket):
    opts = {"endpoint_url": s3}
    over = SMALL + [f"storage.endpoint_url={s3}"]
    _upload(category, f"s3://{bucket}/data/brick", opts)
    manifest = run_fit(f"s3://{bucket}/data/brick", f"s3://{bucket}/models/brick", load_config(None, over))
    assert storage.exists(f"s3://{bucket}/models/brick/manifest.json", **opts)
    m = load_model(f"s3://{bucket}/models/brick", opts)
    assert m.digest == manifest["model_digest"]
    summary = run_score(f"s3://{bucket}/models/brick", f"s3://{bucket}/data/brick/test", f"s3://{bucket}/out",
                        overrides=over)
    n = sum(len(f) for _, _, f in os.walk(f"{category}/test"))
    table = read_scores(f"s3://{bucket}/out", opts)
    assert summary["errors"] == 0
    assert _check_scores(table, n, opts) >= 0.9
    assert all(r["heatmap"].startswith(f"s3://{bucket}/out/heatmaps/{m.digest}/") for r in table.to_pylist())


def test_missing_bucket_is_a_clear_error(ray_local, s3, tmp_path):
    with pytest.raises(JobError, match="not found"):
        run_fit("s3://no-such-bucket-x/train", str(tmp_path / "m"),
                load_config(None, SMALL + [f"storage.endpoint_url={s3}"]))


def test_jobs_cli_exit_codes(tmp_path):
    r = subprocess.run([sys.executable, "jobs/fit.py", "--train", str(tmp_path), "--model", str(tmp_path / "m"),
                        "coreset.ratio=0"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "coreset.ratio" in r.stderr
    r = subprocess.run([sys.executable, "jobs/score.py", "--model", str(tmp_path / "none"), "--images", str(tmp_path),
                        "--output", str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "model not found" in r.stderr


def test_score_without_heatmaps(local_model, category, tmp_path):
    model, _ = local_model
    out = str(tmp_path / "out")
    run_score(model, f"{category}/test/good", out, overrides=SMALL + ["output.heatmaps=false"])
    rows = read_scores(out).to_pylist()
    assert rows and all(r["heatmap"] is None and r["error"] is None and r["score"] > 0 for r in rows)
    assert not os.path.exists(os.path.join(out, "heatmaps"))
