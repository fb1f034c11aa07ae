"""Archives nobody curated, through the real jobs: every file gets its row (scored, or an error row
that names it), nothing hangs, nothing outside the input is read, the job never reads its own output."""
import os
import shutil

import pyarrow.parquet as pq

from patchcore_dist.artifacts.scores import read_scores
from patchcore_dist.config import load_config
from patchcore_dist.pipeline.fit import run_fit
from patchcore_dist.pipeline.score import run_score

from helpers import SMALL


def _good(category, k):
    return os.path.join(f"{category}/test/good", sorted(os.listdir(f"{category}/test/good"))[k])


def _hostile_folder(category, root, outside):
    """Two good images, a name that is not UTF-8, a 1.5 GB sparse '.png', two loop links, a link out of
    the root, a FIFO; returns the names that must be scored."""
    root.mkdir()
    shutil.copy(_good(category, 0), root / "a.png")
    shutil.copy(_good(category, 1), root / "b.png")
    shutil.copy(_good(category, 2), os.fsencode(root) + b"/latin1-\xe9\xff.png")
    with open(root / "sparse.png", "wb") as f:
        f.truncate(1_500_000_000)
    (root / "loop").mkdir()
    os.symlink("..", root / "loop" / "up")
    os.symlink("..", root / "loop" / "again")
    outside.mkdir()
    shutil.copy(_good(category, 3), outside / "secret.png")
    os.symlink(outside, root / "escape")
    os.mkfifo(root / "fifo.png")


def test_score_gives_every_file_its_row_and_reads_nothing_else(small_model, category, tmp_path):
    root = tmp_path / "archive"
    _hostile_folder(category, root, tmp_path / "outside")
    out = root / "out"  # the output inside the input: a previous run's heatmap must not come back in
    (out / "heatmaps").mkdir(parents=True)
    shutil.copy(_good(category, 4), out / "heatmaps" / "old.png.png")
    summary = run_score(small_model, str(root), str(out), overrides=SMALL)
    rows = {os.path.relpath(r["image"], root): r for r in read_scores(str(out)).to_pylist()}
    assert sorted(rows) == ["a.png", "b.png", "latin1-\\xe9\\xff.png", "sparse.png"] and summary["rows"] == 4
    assert rows["a.png"]["error"] is None and rows["b.png"]["error"] is None and rows["a.png"]["heatmap"]
    assert rows["latin1-\\xe9\\xff.png"]["error"].startswith("file name is not valid UTF-8")
    assert rows["sparse.png"]["error"] == ("file is 1500000000 bytes, over the limit image.max_bytes=536870912 "
                                           "(not read)") and rows["sparse.png"]["size"] == 1_500_000_000
    written = [f for _, _, fs in os.walk(out / "heatmaps") for f in fs]
    assert not any("secret" in f for f in written)
    again = run_score(small_model, str(root), str(out), overrides=SMALL)  # its own heatmaps are not inputs
    assert again["images"] == 4 and again["skipped"] == 2  # error rows are retried: errors again, never scores
    assert again["scored"] == 0 and again["errors"] == 2 and again["rows"] == 2


def test_fit_lists_refused_training_files_as_errors(ray_local, category, tmp_path):
    train = tmp_path / "train"
    train.mkdir()
    for name in sorted(os.listdir(f"{category}/train/good"))[:4]:
        shutil.copy(f"{category}/train/good/{name}", train / name)
    shutil.copy(f"{category}/train/good/{name}", os.fsencode(train) + b"/caf\xe9.png")
    with open(train / "huge.png", "wb") as f:
        f.truncate(10_000_000)
    model = str(tmp_path / "model")
    manifest = run_fit(str(train), model, load_config(None, SMALL + ["image.max_bytes=1000000"]))
    assert manifest["training"]["used"] == 4 and manifest["training"]["errors"] == 2
    errors = {os.path.basename(r["image"]): r["error"] for r in pq.read_table(f"{model}/errors.parquet").to_pylist()}
    assert errors["caf\\xe9.png"].startswith("file name is not valid UTF-8")
    assert errors["huge.png"] == "file is 10000000 bytes, over the limit image.max_bytes=1000000 (not read)"


def test_a_heatmap_that_cannot_be_written_keeps_the_score(small_model, category, tmp_path):
    from patchcore_dist.artifacts.model import load_model
    imgs, out = tmp_path / "imgs", tmp_path / "out"
    (imgs / "sub").mkdir(parents=True)
    shutil.copy(_good(category, 0), imgs / "top.png")
    shutil.copy(_good(category, 1), imgs / "sub" / "x.png")
    blocker = out / "heatmaps" / load_model(small_model).digest / "sub"
    blocker.parent.mkdir(parents=True)
    blocker.write_bytes(b"a file where the heatmap folder would go")
    run_score(small_model, str(imgs), str(out), overrides=SMALL)
    rows = {os.path.relpath(r["image"], imgs): r for r in read_scores(str(out)).to_pylist()}
    bad, good = rows["sub/x.png"], rows["top.png"]
    assert bad["error"] is None and bad["score"] > 0 and bad["heatmap"] is None
    assert bad["warning"].startswith("heatmap not written: ")
    assert good["warning"] is None and os.path.exists(good["heatmap"])


def test_a_huge_original_is_rendered_at_a_capped_size(category, tmp_path, monkeypatch):
    """Decode + render stages in process: the model gets a reduced-scale JPEG decode, the heatmap and
    overlay are rendered within the render cap, the row keeps the original size."""
    import numpy as np
    from PIL import Image
    from patchcore_dist.pipeline.stages import decode_batch, render_batch
    from patchcore_dist.render import heatmap
    monkeypatch.setattr(heatmap, "MAX_RENDER_PIXELS", 500_000)
    photo = Image.open(_good(category, 0)).convert("RGB").resize((1600, 1200))
    photo.save(tmp_path / "big.jpg", quality=90)
    cfg = load_config(None, SMALL).to_dict()
    batch = decode_batch({"uri": np.array([str(tmp_path / "big.jpg")], object), "rel": np.array(["big.jpg"], object)},
                         cfg, keep_bytes=True)
    assert not batch["error"][0] and (batch["height"][0], batch["width"][0]) == (1200, 1600)
    grid = np.tile(np.linspace(0, 1, 16, dtype=np.float32), 16)[None]
    out = render_batch(dict(batch, patch_scores=grid, grid_h=np.array([16]), grid_w=np.array([16])), cfg,
                       str(tmp_path / "heat"), (0.0, 1.0))
    assert not out["warning"][0] and out["heatmap"][0]
    w, h = Image.open(out["heatmap"][0]).size
    assert w * h <= 500_000 and abs(w / h - 4 / 3) < 0.01 and w > 800
    assert Image.open(tmp_path / "heat" / "big.jpg_overlay.jpg").size == (w, h)


def test_s3_keys_keep_distinct_heatmaps_and_odd_keys_get_error_rows(small_model, category, s3, bucket):
    import boto3
    client = boto3.client("s3", endpoint_url=s3)
    keys = ["a/b.png", "a\\b.png", "a//b.png", "a/./b.png", "a/../b.png"]
    for k, key in enumerate(keys):  # distinct images under keys that sanitise alike
        client.put_object(Bucket=bucket, Key=f"keys/{key}", Body=open(_good(category, k), "rb").read())
    over = SMALL + [f"storage.endpoint_url={s3}"]
    out = f"s3://{bucket}/keys-out"
    run_score(small_model, f"s3://{bucket}/keys", out, overrides=over)
    rows = {r["image"][len(f"s3://{bucket}/keys/"):]: r for r in read_scores(out, {"endpoint_url": s3}).to_pylist()}
    assert sorted(rows) == sorted(keys)
    plain, backslash = rows["a/b.png"], rows["a\\b.png"]
    assert plain["error"] is None and backslash["error"] is None and plain["score"] != backslash["score"]
    assert plain["heatmap"] != backslash["heatmap"]
    listed = {o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="keys-out/heatmaps/")["Contents"]}
    assert {h[len(f"s3://{bucket}/"):] for h in (plain["heatmap"], backslash["heatmap"])} <= listed
    for odd in ("a//b.png", "a/./b.png", "a/../b.png"):  # never read as another key's bytes
        assert rows[odd]["score"] is None and "cannot address exactly" in rows[odd]["error"]


def test_a_bad_mask_is_that_images_error_in_the_metrics(small_model, category, tmp_path):
    import json
    import numpy as np
    from PIL import Image
    from patchcore_dist.pipeline.evaluate import run_evaluate
    data = tmp_path / "cat"
    shutil.copytree(category, data)
    truncated = sorted(os.listdir(data / "ground_truth" / "hole"))[0]
    raw = (data / "ground_truth" / "hole" / truncated).read_bytes()
    (data / "ground_truth" / "hole" / truncated).write_bytes(raw[: len(raw) // 2])
    huge = sorted(os.listdir(data / "ground_truth" / "stain"))[0]
    Image.fromarray(np.zeros((1200, 1000), np.uint8)).save(data / "ground_truth" / "stain" / huge)
    out = tmp_path / "eval"
    m = run_evaluate(small_model, str(data), str(out), overrides=SMALL + ["image.max_pixels=1000000"])
    saved = json.loads((out / "metrics.json").read_text())
    errors = {os.path.relpath(e["image"], data / "test"): e["error"] for e in saved["errors"]}
    image_of = lambda d, mask: f"{d}/{mask.replace('_mask', '')}"  # noqa: E731
    assert set(errors) == {image_of("hole", truncated), image_of("stain", huge)}
    assert "corrupt or truncated" in errors[image_of("hole", truncated)]
    assert "over the limit image.max_pixels=1000000" in errors[image_of("stain", huge)]
    n_test = sum(len(f) for _, _, f in os.walk(data / "test"))
    assert m["images"] == n_test and m["scored"] == n_test - 2 and m["pixel_auroc"] > 0.8
    assert (out / "report.html").exists()
