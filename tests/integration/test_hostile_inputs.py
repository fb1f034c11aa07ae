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
    assert again["images"] == 4 and again["scored"] == 2 and again["skipped"] == 2  # error rows are retried


def test_fit_lists_refused_training_files_as_errors(ray_local, category, tmp_path):
    train = tmp_path / "train"
    train.mkdir()
    for k, name in enumerate(sorted(os.listdir(f"{category}/train/good"))[:4]):
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
