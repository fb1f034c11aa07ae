"""Score runs over manifests and dry runs (issue 29): a manifest's URIs are the rows' images, its
refused entries error rows, the run record names it; a dry run plans and writes nothing; first-time
rows are appended, re-scored ones merged; an S3 entry without an ETag is read and its digest decides."""
import json
import os
import shutil

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from patchcore_dist.artifacts.runs import read_runs
from patchcore_dist.artifacts.scores import read_scores
from patchcore_dist.cli import main
from patchcore_dist.config import load_config
from patchcore_dist.pipeline.fit import run_fit
from patchcore_dist.pipeline.score import run_score

from helpers import SMALL

LOCAL = SMALL + ["runtime.executor=local", "output.heatmaps=false"]


@pytest.fixture(scope="module")
def model(category, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("manifest-model") / "model")
    run_fit(f"{category}/train/good", path, load_config(None, LOCAL))
    return path


def _images(category, folder, n=3):
    folder.mkdir()
    for name in sorted(os.listdir(f"{category}/test/good"))[:n]:
        shutil.copy(f"{category}/test/good/{name}", folder / name)
    return sorted(str(folder / f) for f in os.listdir(folder))


def _operations(out):
    log = os.path.join(out, "scores", "_delta_log")
    return [json.loads(line)["commitInfo"]["operation"] for f in sorted(os.listdir(log)) if f.endswith(".json")
            for line in open(os.path.join(log, f)) if '"commitInfo"' in line]


def test_a_dry_run_plans_and_writes_nothing(model, category, tmp_path, capsys):
    images = _images(category, tmp_path / "imgs")
    out = tmp_path / "out"
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"image": images + [images[0], str(tmp_path / "gone.png")]}), manifest)
    for src, given in ((tmp_path / "imgs", ""), (manifest, " (the manifest gave 5 URIs)")):
        assert main(["score", "--dry-run", "--model", model, "--images", str(src), "--output", str(out),
                     *LOCAL]) == 0
        refused = 1 if given else 0
        assert (f"dry run: {3 + refused} images{given}: 3 new, 0 changed, 0 unchanged, {refused} refused; nothing "
                f"written to {out}") in capsys.readouterr().out
        assert not out.exists()
    run_score(model, str(tmp_path / "imgs"), str(out), overrides=LOCAL)
    os.utime(images[0], (1, 1))  # one file changed (its times), the others not
    before = sorted(os.listdir(out)), sorted(os.listdir(out / "scores" / "_delta_log"))
    s = run_score(model, str(tmp_path / "imgs"), str(out), overrides=LOCAL, dry_run=True)
    assert (s["images"], s["new"], s["changed"], s["unchanged"], s["refused"]) == (3, 0, 1, 2, 0)
    assert (sorted(os.listdir(out)), sorted(os.listdir(out / "scores" / "_delta_log"))) == before
    assert len(read_runs(str(out), {})) == 1


def test_a_manifest_run_scores_its_uris_and_refuses_its_bad_entries(model, category, tmp_path):
    images = _images(category, tmp_path / "imgs")
    out = str(tmp_path / "out")
    (tmp_path / "imgs" / "sub").mkdir()
    manifest = tmp_path / "today.csv"
    rel = os.path.relpath(images[1], tmp_path)  # relative to the manifest's folder
    manifest.write_text("image\n" + "\n".join([images[0], rel, f"{tmp_path}/imgs/sub/../{os.path.basename(images[2])}",
                                               f"{tmp_path}/imgs/missing.png", "/elsewhere/x.png"]) + "\n")
    s = run_score(model, str(manifest), out, overrides=LOCAL, images_root=str(tmp_path / "imgs"))
    assert (s["images"], s["scored"], s["errors"]) == (5, 2, 3)
    rows = {r["image"]: r for r in read_scores(out).to_pylist()}
    assert rows[images[0]]["score"] is not None and rows[images[1]]["error"] is None  # resolved, stored absolute
    assert "'..' segment" in rows[f"{tmp_path}/imgs/sub/../{os.path.basename(images[2])}"]["error"]
    assert rows[f"{tmp_path}/imgs/missing.png"]["error"] == "not found"
    assert rows["/elsewhere/x.png"]["error"] == f"outside --images-root {tmp_path}/imgs"
    record = read_runs(out, {})[-1]
    assert record["inputs"] == str(manifest) and record["manifest_uris"] == 5
    assert set(rows[i]["run"] for i in rows) == {record["run_id"]}  # a row joins its run record by `run`
    assert _operations(out)[-1] == "WRITE"  # every image new: appended, no MERGE
    again = run_score(model, str(manifest), out, overrides=LOCAL, images_root=str(tmp_path / "imgs"))
    assert (again["scored"], again["skipped"], again["errors"]) == (0, 2, 3)  # the refused ones retried
    assert _operations(out)[-1] == "MERGE"  # rows exist (the error rows): merged


def test_an_s3_manifest_entry_without_an_etag_is_verified_by_its_digest(model, category, tmp_path, s3, bucket):
    [image] = _images(category, tmp_path / "imgs", 1)
    client = boto3.client("s3", endpoint_url=s3, region_name="us-east-1")
    client.put_object(Bucket=bucket, Key="manifest-run/a.png", Body=open(image, "rb").read())
    uri = f"s3://{bucket}/manifest-run/a.png"
    etag = client.head_object(Bucket=bucket, Key="manifest-run/a.png")["ETag"]
    over = LOCAL + [f"storage.endpoint_url={s3}"]
    out = str(tmp_path / "out")
    bare, tagged = tmp_path / "bare.parquet", tmp_path / "tagged.parquet"
    pq.write_table(pa.table({"image": [uri]}), bare)
    pq.write_table(pa.table({"image": [uri], "etag": [etag]}), tagged)
    assert run_score(model, str(bare), out, overrides=over)["scored"] == 1
    again = run_score(model, str(bare), out, overrides=over, dry_run=True)
    assert (again["changed"], again["unchanged"]) == (1, 0)  # no ETag: it must be read
    s = run_score(model, str(bare), out, overrides=over)
    assert (s["scored"], s["skipped"]) == (0, 1)  # read, its digest the row's: not scored again
    s = run_score(model, str(tagged), out, overrides=over)  # the ETag differs from the row's null: read once
    assert (s["scored"], s["skipped"]) == (0, 1)
    assert run_score(model, str(tagged), out, overrides=over, dry_run=True)["unchanged"] == 1
