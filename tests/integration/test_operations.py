"""Operations: incremental re-scoring, retraining with reuse, thresholds, bad input, faults, security."""
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from patchcore_dist.artifacts import storage
from patchcore_dist.config import load_config
from patchcore_dist.errors import JobError
from patchcore_dist.pipeline.fit import run_fit
from patchcore_dist.artifacts.model import load_model
from patchcore_dist.artifacts.scores import read_scores
from patchcore_dist.pipeline.score import run_score

from patchcore_dist.pipeline.faults import FAULT_ENV
from helpers import ROOT, SMALL



@pytest.fixture(scope="module")
def model(ray_local, category, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ops") / "model")
    run_fit(category, path, load_config(None, SMALL + ["fit.holdout_fraction=0.2", "fit.target_fpr=0.0"]))
    return path


def _copy_tree(src, dst, limit=None):
    os.makedirs(dst, exist_ok=True)
    names = sorted(os.listdir(src))[:limit]
    for n in names:
        shutil.copy(os.path.join(src, n), os.path.join(dst, n))
    return names


def test_incremental_rescoring(model, category, tmp_path, caplog):
    imgs, out = tmp_path / "archive", str(tmp_path / "out")
    _copy_tree(f"{category}/test/good", imgs / "good")
    names = _copy_tree(f"{category}/test/hole", imgs / "hole")
    first = run_score(model, str(imgs), out, overrides=SMALL)
    n = first["images"]
    assert first["scored"] == n
    with caplog.at_level("INFO"):
        again = run_score(model, str(imgs), out, overrides=SMALL)
    assert again["scored"] == 0 and again["skipped"] == n and "nothing to do" in caplog.text
    # one new image, one changed image, one touched but unchanged image
    shutil.copy(f"{category}/test/stain/{sorted(os.listdir(f'{category}/test/stain'))[0]}", imgs / "new.png")
    changed = imgs / "hole" / names[0]
    Image.fromarray(255 - np.asarray(Image.open(changed).convert("RGB"))).save(changed)
    touched = imgs / "good" / sorted(os.listdir(imgs / "good"))[0]
    os.utime(touched, (time.time() + 5, time.time() + 5))
    third = run_score(model, str(imgs), out, overrides=SMALL)
    assert third["scored"] == 2 and third["skipped"] == n - 1
    table = read_scores(out).to_pylist()
    assert len(table) == n + 1 and len({r["image"] for r in table}) == n + 1  # never duplicated
    forced = run_score(model, str(imgs), out, overrides=SMALL, rescore="all")
    assert forced["scored"] == n + 1
    assert len(read_scores(out)) == n + 1


def test_calibrated_threshold_sets_is_anomaly(model, category, tmp_path):
    m = load_model(model)
    st = m.manifest["stats"]
    assert st["validation_images"] >= 2 and st["threshold"] == st["validation_scores"]["max"]  # target FPR 0
    out = str(tmp_path / "out")
    run_score(model, f"{category}/test", out, overrides=SMALL)
    rows = read_scores(out).to_pylist()
    assert all(r["is_anomaly"] == (r["score"] > st["threshold"]) for r in rows)
    bad = [r["is_anomaly"] for r in rows if "/good/" not in r["image"]]
    assert np.mean(bad) >= 0.8


def test_new_model_writes_beside_the_old(model, category, tmp_path):
    other = str(tmp_path / "other")
    run_fit(category, other, load_config(None, SMALL + ["coreset.ratio=0.05"]))
    out = str(tmp_path / "out")
    a = run_score(model, f"{category}/test/good", out, overrides=SMALL)
    b = run_score(other, f"{category}/test/good", out, overrides=SMALL)
    assert a["model"] != b["model"] and b["scored"] == a["scored"]
    table = read_scores(out)
    assert sorted(set(table.column("model").to_pylist())) == sorted([a["model"], b["model"]])
    assert len(read_scores(out, model=a["model"])) == a["scored"]
    assert os.path.isdir(os.path.join(out, "heatmaps", a["model"])) and os.path.isdir(os.path.join(out, "heatmaps", b["model"]))


def test_refit_reuses_unchanged_images(ray_local, category, tmp_path):
    train = tmp_path / "train"
    names = _copy_tree(f"{category}/train/good", train)
    old, new = str(tmp_path / "old"), str(tmp_path / "new")
    run_fit(str(train), old, load_config(None, SMALL))
    os.remove(train / names[0])  # deleted image drops out
    shutil.copy(f"{category}/test/good/{sorted(os.listdir(f'{category}/test/good'))[0]}", train / "added.png")
    m = run_fit(str(train), new, load_config(None, SMALL), reuse=old)
    assert m["training"]["reused"] == len(names) - 1 and m["training"]["used"] == len(names)
    imgs = pq.read_table(os.path.join(new, "images.parquet")).to_pylist()
    assert {os.path.basename(r["uri"]) for r in imgs} == set(names[1:]) | {"added.png"}
    # the reused features are the old ones, bit for bit
    old_feats = {r["image_id"]: r["features"] for r in pq.read_table(os.path.join(old, "features")).to_pylist()}
    new_feats = {r["image_id"]: r["features"] for r in pq.read_table(os.path.join(new, "features")).to_pylist()}
    common = set(old_feats) & set(new_feats)
    assert len(common) == len(names) - 1 and all(old_feats[k] == new_feats[k] for k in list(common)[:3])
    load_model(old)  # the old model stays valid
    load_model(new)
    shard = sorted(os.listdir(os.path.join(old, "features")))[0]
    with open(os.path.join(old, "features", shard), "r+b") as f:
        f.seek(100)
        f.write(b"corrupt")
    with pytest.raises(JobError, match="sha256"):
        run_fit(str(train), str(tmp_path / "y"), load_config(None, SMALL), reuse=old)
    (tmp_path / "notamodel").mkdir()
    (tmp_path / "notamodel" / "precious.txt").write_text("keep me")
    with pytest.raises(JobError, match="holds files no fit wrote"):
        run_fit(str(train), str(tmp_path / "notamodel"), load_config(None, SMALL))
    assert (tmp_path / "notamodel" / "precious.txt").exists()
    with pytest.raises(JobError, match="other feature settings"):
        run_fit(str(train), str(tmp_path / "x"), load_config(None, SMALL + ["embedding.target_dim=512"]), reuse=old)


def test_bad_training_images_are_listed_and_no_usable_image_is_an_error(ray_local, category, tmp_path):
    train = tmp_path / "train"
    _copy_tree(f"{category}/train/good", train, limit=4)
    (train / "zero.png").write_bytes(b"")
    (train / "notes.jpg").write_text("hello")
    model = str(tmp_path / "m")
    m = run_fit(str(train), model, load_config(None, SMALL))
    assert m["training"]["errors"] == 2 and m["training"]["used"] == 4
    errs = pq.read_table(os.path.join(model, "errors.parquet")).to_pylist()
    assert {os.path.basename(e["image"]) for e in errs} == {"zero.png", "notes.jpg"}
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"")
    (bad / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(JobError, match="none of the 2 training images"):
        run_fit(str(bad), str(tmp_path / "m2"), load_config(None, SMALL))
    assert not os.path.exists(os.path.join(tmp_path, "m2", "manifest.json"))


def test_image_limits_and_odd_names(model, category, tmp_path):
    imgs = tmp_path / "odd"
    imgs.mkdir()
    src = f"{category}/test/good/{sorted(os.listdir(f'{category}/test/good'))[0]}"
    long_name = "x" * 200 + ".png"
    for name in ("..evil.png", long_name, "sp ace&semi;colon.png"):
        shutil.copy(src, imgs / name)
    Image.new("RGB", (8, 8)).save(imgs / "tiny.png")
    Image.new("RGB", (900, 900)).save(imgs / "huge.png")
    out = tmp_path / "out"
    run_score(model, str(imgs), str(out), overrides=SMALL + ["image.max_pixels=500000"])
    rows = {os.path.basename(r["image"]): r for r in read_scores(str(out)).to_pylist()}
    assert "smaller than" in rows["tiny.png"]["error"] and "over the limit" in rows["huge.png"]["error"]
    for name in ("..evil.png", long_name, "sp ace&semi;colon.png"):
        h = rows[name]["heatmap"]
        assert h.startswith(str(out / "heatmaps")) and os.path.exists(h) and ".." not in h[len(str(out)):]
        assert all(len(part) <= 130 for part in h.split("/"))  # long names shortened (+ ".png")
    assert storage.safe_relpath("../../etc/passwd").startswith("etc/passwd-")
    assert storage.safe_relpath("a b.png") != storage.safe_relpath("a_b.png")
    assert storage.safe_relpath("/abs/./x/../y.png").startswith("abs/x/y-")


def test_interrupted_job_rerun_completes_without_duplicates(model, category, tmp_path):
    imgs = tmp_path / "arch"
    for sub in ("good", "hole", "foreign"):
        _copy_tree(f"{category}/test/{sub}", imgs / sub)
    n = sum(len(f) for _, _, f in os.walk(imgs))
    out = str(tmp_path / "out")
    args = [sys.executable, "jobs/score.py", "--model", model, "--images", str(imgs), "--output", out] + SMALL
    marker = tmp_path / "stopped"  # the driver stops itself at its 3rd heatmap batch: killed mid-run, never late
    env = {**os.environ, FAULT_ENV: f"render:3:{marker}:stop"}
    p = subprocess.Popen(args + ["runtime.batch_size=1", "runtime.executor=local"], cwd=ROOT,
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not marker.exists() and p.poll() is None:
            time.sleep(0.2)
        assert marker.exists(), f"the job ended ({p.poll()}) before its 3rd heatmap batch"
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    visible = [f for d, _, fs in os.walk(out) for f in fs if not f.startswith(".") and "_delta_log" not in d]
    assert visible and all(f.endswith((".png", ".jpg", ".parquet")) for f in visible)  # no run record: not ended
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = read_scores(out).to_pylist()
    assert len(rows) == n and len({x["image"] for x in rows}) == n


def test_credentials_never_written_or_logged(ray_local, category, s3, bucket, tmp_path, caplog):
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    key = os.environ["AWS_ACCESS_KEY_ID"]
    over = SMALL + [f"storage.endpoint_url={s3}"]
    with caplog.at_level("INFO"):
        run_fit(f"{category}/train/good", f"s3://{bucket}/sec/model", load_config(None, over))
        run_score(f"s3://{bucket}/sec/model", f"{category}/test/good", str(tmp_path / "o"), overrides=over)
    opts = {"endpoint_url": s3}
    for uri, _ in storage.list_files(f"s3://{bucket}/sec/model", (".json", ".yaml"), **opts):
        text = storage.read_bytes(uri, **opts).decode()
        assert secret not in text and f'"{key}"' not in text
    assert secret not in caplog.text


def test_evaluate_next_to_other_score_runs(model, category, tmp_path):
    from patchcore_dist.pipeline.evaluate import run_evaluate
    out = str(tmp_path / "out")
    run_score(model, f"{category}/train/good", out, overrides=SMALL)  # other rows in the same output
    m = run_evaluate(model, category, out, overrides=SMALL)
    n_test = sum(len(f) for _, _, f in os.walk(f"{category}/test"))
    assert m["images"] == n_test and m["pixel_auroc"] > 0.9


def test_s3_keys_with_odd_characters(s3, bucket):
    opts = {"endpoint_url": s3}
    uri = f"s3://{bucket}/odd/a#1?x=2.png"
    storage.write_bytes(uri, b"data", **opts)
    entries = storage.list_entries(f"s3://{bucket}/odd/", None, **opts)
    assert [e["uri"] for e in entries] == [uri] and entries[0]["rel"] == "a#1?x=2.png"
    assert storage.read_bytes(uri, **opts) == b"data"
