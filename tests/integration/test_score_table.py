"""The score table under real score runs: two runs at once on one output (processes, local and S3),
a run killed right before its commit, and the incremental skip that does not trust size + mtime."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from patchcore_dist.artifacts import delta, scores
from patchcore_dist.artifacts.scores import read_scores
from patchcore_dist.config import load_config
from patchcore_dist.pipeline.fit import run_fit
from patchcore_dist.pipeline.score import run_score

from helpers import ROOT, SMALL

CONFLICT = "gave up after"  # the documented message of a run whose commits were always overtaken


@pytest.fixture(scope="module")
def model(ray_local, category, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("table") / "model")
    run_fit(f"{category}/train/good", path, load_config(None, SMALL))
    return path


def _archive(category, root, subs=("good", "hole", "stain")):
    for sub in subs:
        os.makedirs(root / sub, exist_ok=True)
        for name in sorted(os.listdir(f"{category}/test/{sub}"))[:4]:
            shutil.copy(f"{category}/test/{sub}/{name}", root / sub / name)
    return sum(len(f) for _, _, f in os.walk(root))


def _job(model, images, out, extra=(), env=None):
    """`jobs/score.py` as its own process, joining the test session's Ray instance."""
    import ray
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address, **(env or {}))
    args = [sys.executable, "jobs/score.py", "--model", model, "--images", images, "--output", out,
            "output.overlay=false"] + SMALL + list(extra)
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_runs_at_once_on_overlapping_images(model, category, tmp_path, where, request):
    imgs = tmp_path / "archive"
    n = _archive(category, imgs)
    extra, opts = [], {}
    if where == "s3":
        s3, bucket = request.getfixturevalue("s3"), request.getfixturevalue("bucket")
        out, extra, opts = f"s3://{bucket}/concurrent", [f"storage.endpoint_url={s3}"], {"endpoint_url": s3}
    else:
        out = str(tmp_path / "out")
    # the whole archive and one of its folders (the same URIs), started together
    runs = [_job(model, str(imgs), out, extra), _job(model, str(imgs / "hole"), out, extra)]
    logs = [p.communicate(timeout=600)[0] for p in runs]
    codes = [p.returncode for p in runs]
    assert all(c == 0 or (c == 2 and CONFLICT in log) for c, log in zip(codes, logs)), logs[0][-3000:] + logs[1][-3000:]
    assert 0 in codes
    rows = read_scores(out, opts).to_pylist()
    assert len(rows) == n and len({r["image"] for r in rows}) == n and all(r["error"] is None for r in rows)
    if where == "local":  # another reader of the same table, not ours
        import polars as pl
        frame = pl.read_delta(scores.scores_uri(out))
        assert sorted(zip(frame["image"].to_list(), frame["score"].to_list())) == \
            sorted((r["image"], r["score"]) for r in rows)


def test_run_killed_before_its_commit_leaves_the_previous_version(model, category, tmp_path):
    imgs = tmp_path / "archive"
    _archive(category, imgs, ("good",))
    out = str(tmp_path / "out")
    first = run_score(model, str(imgs), out, overrides=SMALL)
    version = delta.load(scores.scores_uri(out), {}).version()
    before = sorted(read_scores(out).to_pylist(), key=lambda r: r["image"])
    n = _archive(category, imgs, ("good", "hole"))
    p = _job(model, str(imgs), out, env={scores.KILL_BEFORE_COMMIT: "1"})
    log = p.communicate(timeout=600)[0]
    assert p.returncode == 75, log[-3000:]
    heatmaps = os.listdir(os.path.join(out, "heatmaps", first["model"], "hole"))
    assert len(heatmaps) == len(os.listdir(imgs / "hole"))  # the killed run had written them
    assert delta.load(scores.scores_uri(out), {}).version() == version
    assert sorted(read_scores(out).to_pylist(), key=lambda r: r["image"]) == before
    again = run_score(model, str(imgs), out, overrides=SMALL)
    rows = read_scores(out).to_pylist()
    assert again["scored"] == n - first["rows"] and len(rows) == n and len({r["image"] for r in rows}) == n


def test_changed_content_with_size_and_mtime_set_back_is_scored_again(model, category, tmp_path):
    """Same size and mtime, other content (e.g. an rsync -t of a re-exported image): the change time
    tells, so the image is read again (and re-scored, its digest differs)."""
    imgs = tmp_path / "archive"
    imgs.mkdir()
    src = sorted(os.listdir(f"{category}/test/good"))[:3]
    for name in src:  # uncompressed PNGs: equal size for equal dimensions
        Image.open(f"{category}/test/good/{name}").convert("RGB").save(imgs / name, compress_level=0)
    out = str(tmp_path / "out")
    run_score(model, str(imgs), out, overrides=SMALL + ["output.heatmaps=false"])
    target = imgs / src[0]
    st = os.stat(target)
    other = np.asarray(Image.open(f"{category}/test/hole/{sorted(os.listdir(f'{category}/test/hole'))[0]}")
                       .convert("RGB").resize(Image.open(target).size))
    Image.fromarray(other).save(target, compress_level=0)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.path.getsize(target) == st.st_size and os.stat(target).st_mtime_ns == st.st_mtime_ns
    again = run_score(model, str(imgs), out, overrides=SMALL + ["output.heatmaps=false"])
    assert again["scored"] == 1 and again["skipped"] == 2
    rows = {os.path.basename(r["image"]): r for r in read_scores(out).to_pylist()}
    assert rows[src[0]]["ctime"] == os.stat(target).st_ctime and rows[src[0]]["run"] != rows[src[1]]["run"]
