"""Many products in one job (issue 28): fit --products writes one model per product and catalog.json,
a failing product is reported without stopping the others, --only refits some, a worse refit is not
promoted under --validation, and catalog rollback restores the previous version."""
from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import shutil

import pytest

from patchcore_dist import cli
from patchcore_dist.artifacts.catalog import read_catalog
from patchcore_dist.artifacts.model import read_manifest
from patchcore_dist.synthetic.categories import make_demo_benchmark

from helpers import SIZE, SMALL


@pytest.fixture(scope="module")
def products(tmp_path_factory):
    """brick and gravel (MVTec layout: fitted on train/good), an empty folder and one of broken files."""
    root = tmp_path_factory.mktemp("products")
    make_demo_benchmark(str(root), categories=("brick", "gravel"), n_images=12, size=SIZE, seed=0)
    (root / "empty").mkdir()
    (root / "broken").mkdir()
    (root / "broken" / "a.png").write_bytes(b"not a png")
    return str(root)


@pytest.fixture(scope="module")
def fitted(products, tmp_path_factory):
    """One fit --products job over all four folders: its exit code, output and catalogue."""
    models = str(tmp_path_factory.mktemp("catalog") / "models")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = cli.main(["fit", "--products", products, "--models", models, *SMALL])
    return {"rc": rc, "models": models, "catalog": read_catalog(models, {}), "stderr": err.getvalue()}


def test_one_job_fits_every_product_and_reports_the_failed(fitted, products, capsys):
    assert fitted["rc"] == 2  # some products failed
    assert "2 of 4 products failed (broken, empty)" in fitted["stderr"]
    assert "empty: no images under" in fitted["stderr"]
    cat = fitted["catalog"]
    assert cat["format_version"] == 1 and sorted(cat["products"]) == ["brick", "gravel"]
    for name, e in cat["products"].items():
        assert e["model"] == os.path.join(fitted["models"], name, e["version"])
        m = read_manifest(e["model"])
        assert m["model_digest"] == e["digest"] and e["images"] == m["training"]["used"] > 0
        assert m["training"]["uri"] == os.path.join(products, name, "train", "good")
        assert e["previous"] == []


def test_only_refits_some_products_and_keeps_the_previous_version(fitted, products, capsys):
    before = read_catalog(fitted["models"], {})["products"]
    assert cli.main(["fit", "--products", products, "--models", fitted["models"], "--only", "gravel", *SMALL]) == 0
    after = read_catalog(fitted["models"], {})["products"]
    assert after["brick"] == before["brick"]
    assert after["gravel"]["version"] != before["gravel"]["version"]
    assert after["gravel"]["previous"][0]["version"] == before["gravel"]["version"]
    assert os.path.exists(os.path.join(before["gravel"]["model"], "manifest.json"))  # the old version stays
    assert "gravel" in capsys.readouterr().out


def test_a_worse_refit_is_not_promoted_and_rollback_restores_the_previous(fitted, products, tmp_path, capsys):
    """brick refitted on its own defective test images (their defects become normal patches) scores
    worse on brick's test set: the current version stays and the refusal records both AUROCs."""
    bad = tmp_path / "bad" / "brick"
    bad.mkdir(parents=True)
    for p in glob.glob(f"{products}/brick/test/*/*.png"):
        if "/good/" not in p:
            shutil.copy(p, bad / f"{os.path.basename(os.path.dirname(p))}_{os.path.basename(p)}")
    current = read_catalog(fitted["models"], {})["products"]["brick"]
    rc = cli.main(["fit", "--products", str(tmp_path / "bad"), "--models", fitted["models"], "--validation", products,
                   *SMALL])
    assert rc == 0
    e = read_catalog(fitted["models"], {})["products"]["brick"]
    assert e["version"] == current["version"]
    p = e["refused"]["promotion"]
    assert p["promoted"] is False and p["new_auroc"] < p["current_auroc"]
    assert os.path.exists(os.path.join(e["refused"]["model"], "manifest.json"))
    # a promotion with --promote always takes it anyway; rollback brings the earlier one back
    assert cli.main(["fit", "--products", str(tmp_path / "bad"), "--models", fitted["models"], "--validation",
                     products, "--promote", "always", *SMALL]) == 0
    e = read_catalog(fitted["models"], {})["products"]["brick"]
    assert e["version"] != current["version"] and e["promotion"]["promoted"] is True
    capsys.readouterr()
    assert cli.main(["catalog", "rollback", "brick", "--models", fitted["models"]]) == 0
    assert current["version"] in capsys.readouterr().out
    assert read_catalog(fitted["models"], {})["products"]["brick"]["version"] == current["version"]
    assert cli.main(["catalog", "list", "--models", fitted["models"]]) == 0
    listed = capsys.readouterr().out
    assert "brick" in listed and "gravel" in listed and current["version"] in listed


def test_catalog_json_is_one_json_object(fitted):
    with open(os.path.join(fitted["models"], "catalog.json")) as f:
        assert set(json.load(f)) == {"format_version", "products"}


@pytest.fixture(scope="module")
def archive(products, tmp_path_factory):
    """AROOT/<product>/...: brick's and gravel's test images, and a folder of a product with no model."""
    root = tmp_path_factory.mktemp("archive")
    for name in ("brick", "gravel"):
        shutil.copytree(f"{products}/{name}/test", root / name)
    shutil.copy(sorted(glob.glob(f"{products}/brick/test/good/*.png"))[0], root / "loose.png")
    (root / "pebbles").mkdir()
    for p in sorted(glob.glob(f"{products}/gravel/train/good/*.png"))[:2]:
        shutil.copy(p, root / "pebbles")
    return str(root)


def _table(output):
    from patchcore_dist.artifacts.scores import read_scores
    return read_scores(output, {}).to_pylist()


def test_score_routes_images_to_their_products_models_incrementally(fitted, products, archive, tmp_path,
                                                                    monkeypatch, capsys):
    import pyarrow as pa

    from patchcore_dist.artifacts import scores
    out = str(tmp_path / "out")
    cat = read_catalog(fitted["models"], {})["products"]
    # a table written before the product column existed: a single-model score with the old schema
    old = pa.schema([f for f in scores.SCORE_SCHEMA if f.name != "product"])
    with monkeypatch.context() as m:
        m.setattr(scores, "SCORE_SCHEMA", old)
        assert cli.main(["score", "--model", cat["gravel"]["model"], "--images", f"{products}/gravel/train/good",
                         "--output", out, *SMALL]) == 0
    single = {r["image"] for r in _table(out)}
    assert cli.main(["score", "--models", fitted["models"], "--images", archive, "--output", out, *SMALL]) == 2
    assert "pebbles" in capsys.readouterr().err
    rows = _table(out)
    by_image = {(r["image"], r["model"]): r for r in rows}
    assert len(by_image) == len(rows)  # one row per image and model
    for name in ("brick", "gravel"):
        mine = [r for r in rows if r["image"].startswith(f"{archive}/{name}/")]
        assert len(mine) == len(glob.glob(f"{archive}/{name}/*/*.png")) > 0
        assert all(r["product"] == name and r["model"] == cat[name]["digest"] and r["error"] is None for r in mine)
    unknown = [r for r in rows if r["image"].startswith(f"{archive}/pebbles/")]
    assert len(unknown) == 2 and all(r["product"] == "pebbles" and "no model in the catalogue" in r["error"]
                                     for r in unknown)
    assert all(r["product"] is None for r in rows if r["image"] in single)  # the old rows: no product
    loose = [r for r in rows if r["image"] == f"{archive}/loose.png"]
    assert len(loose) == 1 and "belongs to no product" in loose[0]["error"] and loose[0]["product"] is None
    from patchcore_dist.artifacts.runs import read_runs
    record = read_runs(out, {})[-1]
    assert record["products"]["brick"]["scored"] == len(glob.glob(f"{archive}/brick/*/*.png"))
    assert record["products"]["pebbles"]["errors"] == 2
    assert {r["run"] for r in rows if r["image"] not in single} == {record["run_id"]}  # the job's one run id
    review = open(os.path.join(out, "review.html")).read()
    assert "Product brick" in review and "Product gravel" in review and "pebbles" in review
    # a second run adds nothing
    cli.main(["score", "--models", fitted["models"], "--images", archive, "--output", out, *SMALL])
    again = read_runs(out, {})[-1]["products"]
    assert again["brick"]["scored"] == again["gravel"]["scored"] == 0 and len(_table(out)) == len(rows)
    assert cli.main(["runs", "--output", out]) == 0
    listed = capsys.readouterr().out
    assert "brick 0/9/0, gravel 0/9/0, pebbles 0/0/2" in listed and "1 x in no product folder" in listed
    # gravel refitted on fewer images (a new model digest: a refit on the same images and settings gives the
    # same digest, and nothing to score again): its images are scored again with the new model, brick's are not
    fewer = tmp_path / "fewer" / "gravel"
    fewer.mkdir(parents=True)
    for p in sorted(glob.glob(f"{products}/gravel/train/good/*.png"))[:5]:
        shutil.copy(p, fewer)
    assert cli.main(["fit", "--products", str(fewer.parent), "--models", fitted["models"], *SMALL]) == 0
    cli.main(["score", "--models", fitted["models"], "--images", archive, "--output", out, *SMALL])
    third = read_runs(out, {})[-1]["products"]
    assert third["brick"]["scored"] == 0
    assert third["gravel"]["scored"] == len(glob.glob(f"{archive}/gravel/*/*.png"))
    assert third["gravel"]["model"] == read_catalog(fitted["models"], {})["products"]["gravel"]["digest"]


def test_evaluate_models_writes_metrics_and_a_report_per_product_and_an_index(fitted, products, tmp_path, capsys):
    out = str(tmp_path / "eval")
    assert cli.main(["evaluate", "--models", fitted["models"], "--dataset", products, "--output", out, *SMALL]) == 0
    cat = read_catalog(fitted["models"], {})["products"]
    for name in ("brick", "gravel"):
        with open(os.path.join(out, name, "metrics.json")) as f:
            m = json.load(f)
        assert m["model"] == cat[name]["digest"] and 0 <= m["image_auroc"] <= 1
        assert os.path.exists(os.path.join(out, name, "report.html"))
    index = open(os.path.join(out, "index.html")).read()
    assert "brick/report.html" in index and "gravel/report.html" in index
    assert "brick" in capsys.readouterr().out


def test_score_routes_a_manifest_by_its_product_column(fitted, products, archive, tmp_path, capsys):
    """A manifest (image, product) routes as folders do: each row with its product's current model, a
    product with no model and a row without a product get error rows, a second run adds nothing."""
    from patchcore_dist.artifacts.runs import read_runs
    cat = read_catalog(fitted["models"], {})["products"]
    lines = ["image,product"]
    for name in ("brick", "gravel"):
        lines += [f"{p},{name}" for p in sorted(glob.glob(f"{archive}/{name}/*/*.png"))[:3]]
    pebbles = sorted(glob.glob(f"{archive}/pebbles/*.png"))
    lines += [f"{pebbles[0]},pebbles", f"{archive}/loose.png,"]
    manifest = tmp_path / "today.csv"
    manifest.write_text("\n".join(lines) + "\n")
    out = str(tmp_path / "out")
    assert cli.main(["score", "--models", fitted["models"], "--images", str(manifest), "--output", out, *SMALL]) == 2
    rows = {r["image"]: r for r in _table(out)}
    assert len(rows) == 8
    for name in ("brick", "gravel"):
        mine = [r for r in rows.values() if r["product"] == name]
        assert len(mine) == 3 and all(r["model"] == cat[name]["digest"] and r["error"] is None for r in mine)
    assert "no model in the catalogue" in rows[pebbles[0]]["error"] and rows[pebbles[0]]["product"] == "pebbles"
    assert "without a product" in rows[f"{archive}/loose.png"]["error"]
    record = read_runs(out, {})[-1]
    assert {r["run"] for r in rows.values()} == {record["run_id"]}
    assert cli.main(["score", "--models", fitted["models"], "--images", str(manifest), "--output", out, *SMALL]) == 2
    again = read_runs(out, {})[-1]["products"]
    assert again["brick"]["scored"] == again["gravel"]["scored"] == 0 and again["brick"]["skipped"] == 3
    manifest.write_text("image\n" + pebbles[0] + "\n")  # no product column: refused with one line
    capsys.readouterr()
    assert cli.main(["score", "--models", fitted["models"], "--images", str(manifest), "--output", out, *SMALL]) == 2
    assert "no 'product' column" in capsys.readouterr().err
