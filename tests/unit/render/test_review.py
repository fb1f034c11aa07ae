"""The review page every score run writes (<output>/review.html), from a real score table: the
highest-scored flagged images named with working links, the run's counts and errors by reason, every
flagged image in the sortable table, nothing fetched from anywhere."""
import json
import os
import re
import shutil
import urllib.parse

from helpers import SMALL
from patchcore_dist import cli
from patchcore_dist.artifacts.model import load_model
from patchcore_dist.artifacts.scores import read_scores
from patchcore_dist.pipeline.score import run_score

LOCAL = SMALL + ["runtime.executor=local"]


def _counts(page: str) -> dict:
    """The run's counts: the first table's header cells and values."""
    table = re.search(r"<table><tr>(.*?)</tr><tr>(.*?)</tr></table>", page, re.S)
    heads = re.findall(r"<th>(.*?)</th>", table.group(1))
    return dict(zip(heads, re.findall(r'<td class="num">(.*?)</td>', table.group(2))))


def _flagged(out: str) -> list[dict]:
    rows = [r for r in read_scores(out).to_pylist() if r["is_anomaly"]]
    return sorted(rows, key=lambda r: (-r["score"], r["image"]))


def _check_self_contained_and_links(page: str, out: str) -> list[str]:
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page) and "<link" not in page
    assert "@import" not in page and "url(" not in page and "<script src" not in page
    assert all(s.startswith("data:image/png;base64,") for s in re.findall(r'src="([^"]+)"', page))
    hrefs = re.findall(r'href="([^"]+)"', page)
    for h in hrefs:
        assert os.path.isfile(os.path.join(out, urllib.parse.unquote(h))), h
    return hrefs


def test_every_score_run_writes_a_review_page(small_model, category, tmp_path, capsys):
    model = small_model
    threshold = load_model(model).manifest["stats"]["threshold"]  # every fit calibrates one
    images, out = tmp_path / "images", str(tmp_path / "out")
    shutil.copytree(os.path.join(category, "test"), images)
    n = sum(len(f) for _, _, f in os.walk(images))
    first = run_score(model, str(images), out, overrides=LOCAL)
    assert first["review"] == os.path.join(out, "review.html")
    page = open(first["review"]).read()
    flagged = _flagged(out)
    assert len(flagged) >= 3
    assert first["flagged"] == [{"image": r["image"], "score": r["score"]} for r in flagged[:12]]
    gallery = page[page.index("highest-scored flagged images"):page.index("Every flagged image")]
    for r in flagged[:12]:
        assert os.path.relpath(r["image"], images) + "<br>score " + f"{r['score']:.3f}" in gallery
    sortable = page[page.index('<table class="sortable">'):]
    assert sortable.count("<tr><td>") == len(flagged)  # every flagged image of the model, once
    assert _counts(page) == {"images listed": str(n), "scored": str(n), "skipped as unchanged": "0", "errors": "0",
                             "flagged this run": f"{len(flagged)} ({100 * len(flagged) / n:.1f}%)"}
    assert f"Decision threshold: <b>{threshold:.3f}</b> (threshold {threshold:.4g} at target FPR" in page
    assert all(f'data-v="{r["normalized_score"]:.6f}"' in sortable for r in flagged)  # the table has the column
    assert all(r["normalized_score"] > 0.5 for r in flagged)
    hrefs = _check_self_contained_and_links(page, out)
    assert len(hrefs) == 3 * (min(12, len(flagged)) + len(flagged))  # image, heatmap, overlay per row

    capsys.readouterr()  # nothing to do (the command): the page reflects the table
    assert cli.main(["score", "--model", model, "--images", str(images), "--output", out] + LOCAL) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"review page: {first['review']}"
    assert printed[1:] == [f"  flagged  score {r['score']:.3f}  {r['image']}" for r in flagged[:5]]
    page = open(first["review"]).read()
    assert _counts(page)["skipped as unchanged"] == str(n) and _counts(page)["scored"] == "0"
    assert page.count("<tr><td>") >= len(flagged) + min(12, len(flagged))

    (images / "good" / "zz_broken.png").write_bytes(b"not an image")
    (images / "good" / "zz_truncated.png").write_bytes(open(flagged[0]["image"], "rb").read()[:300])
    third = run_score(model, str(images), out, overrides=LOCAL)
    page = open(third["review"]).read()
    assert _counts(page)["errors"] == "2" and _counts(page)["skipped as unchanged"] == str(n)
    reasons = page[page.index("Errors of this run by reason"):page.index("<h2>", page.index("by reason"))]
    assert reasons.count("<tr><td>") == len(json.loads(open(third["run"]).read())["errors_by_reason"]) >= 1
    errors = page[page.index("Error rows of this model in the table (2)"):]
    assert "good/zz_broken.png" in errors and "good/zz_truncated.png" in errors
    _check_self_contained_and_links(page, out)


def test_the_review_page_of_an_output_on_s3(small_model, category, s3, bucket, tmp_path):
    import boto3
    model = small_model
    images = tmp_path / "few"
    for d in ("good", "hole"):
        shutil.copytree(os.path.join(category, "test", d), images / d)
    out = f"s3://{bucket}/review-out"
    summary = run_score(model, str(images), out, overrides=LOCAL + [f"storage.endpoint_url={s3}"])
    assert summary["review"] == f"{out}/review.html"
    body = boto3.client("s3", endpoint_url=s3).get_object(Bucket=bucket, Key="review-out/review.html")["Body"]
    page = body.read().decode()
    flagged = [r for r in read_scores(out, {"endpoint_url": s3}).to_pylist() if r["is_anomaly"]]
    assert flagged and summary["flagged"]
    for r in flagged:
        assert f'href="{r["heatmap"]}"' in page and os.path.relpath(r["image"], images) in page
    assert page.count('src="data:image/png;base64,') >= 2 * min(12, len(flagged))  # thumbnails read from S3
