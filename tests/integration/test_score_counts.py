"""A score run's counts add up: every listed image is scored (a new score), skipped (unchanged) or an
error, in the summary, the log line and the run record; a failed image never counts as scored."""
import logging
import os
import shutil

from patchcore_dist.artifacts.runs import read_runs
from patchcore_dist.config import load_config
from patchcore_dist.pipeline.fit import run_fit
from patchcore_dist.pipeline.score import run_score

from helpers import SMALL

LOCAL = SMALL + ["runtime.executor=local"]  # in process: no Ray needed


def test_listed_images_are_scored_skipped_or_errors(category, tmp_path, caplog):
    model = str(tmp_path / "model")
    run_fit(f"{category}/train/good", model, load_config(None, LOCAL))
    imgs, out = tmp_path / "imgs", str(tmp_path / "out")
    imgs.mkdir()
    good = sorted(os.listdir(f"{category}/test/good"))[:3]
    for name in good:
        shutil.copy(f"{category}/test/good/{name}", imgs / name)
    raw = (imgs / good[0]).read_bytes()
    (imgs / "truncated.png").write_bytes(raw[: len(raw) // 3])  # a PNG cut short
    (imgs / "notes.png").write_bytes(b"not an image at all")
    with caplog.at_level(logging.INFO, logger="patchcore_dist"):
        first = run_score(model, str(imgs), out, overrides=LOCAL)
    assert (first["images"], first["scored"], first["skipped"], first["errors"]) == (5, 3, 0, 2)
    assert first["images"] == first["scored"] + first["skipped"] + first["errors"] and first["rows"] == 5
    assert "score done: 5 images: 3 scored, 0 skipped as unchanged, 2 errors;" in caplog.text
    record = read_runs(out, {})[-1]
    assert (record["images_listed"], record["scored"], record["skipped"], record["errors"]) == (5, 3, 0, 2)
    assert sum(record["errors_by_reason"].values()) == 2 and len(record["score_quantiles"]) > 0

    again = run_score(model, str(imgs), out, overrides=LOCAL)  # the good ones unchanged, the bad ones retried
    assert (again["images"], again["scored"], again["skipped"], again["errors"]) == (5, 0, 3, 2)
    assert read_runs(out, {})[-1]["scored"] == 0
