"""Contaminated training folders (issue 26): train_outliers.parquet ranks the escapes first, denoising keeps
their defect patches out of the memory bank, and fit --exclude leaves reviewed images out."""
import glob
import json
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from patchcore_dist import cli
from patchcore_dist.api import Model
from patchcore_dist.artifacts.runs import read_runs
from patchcore_dist.config import load_config
from patchcore_dist.pipeline.fit import run_fit

from helpers import SMALL

KINDS = ("stain", "hole", "foreign")


@pytest.fixture(scope="module")
def contaminated(category, tmp_path_factory):
    """The brick category's train/good with one defective test image of each of KINDS copied in, fitted
    with denoising off and on."""
    root = tmp_path_factory.mktemp("contaminated")
    train = root / "train"
    shutil.copytree(f"{category}/train/good", train)
    copied = []
    for kind in KINDS:
        src = sorted(glob.glob(f"{category}/test/{kind}/*.png"))[0]
        copied.append(str(train / f"{kind}_{os.path.basename(src)}"))
        shutil.copy(src, copied[-1])
    models = {}
    for name, over in (("off", []), ("on", ["denoise.enabled=true"])):
        models[name] = str(root / f"model-{name}")
        run_fit(str(train), models[name], load_config(None, SMALL + over))
    return {"train": str(train), "copied": copied, "models": models, "root": root}


def _outliers(model: str) -> dict:
    return pq.read_table(f"{model}/train_outliers.parquet").to_pydict()


def test_the_copied_defective_images_rank_first(contaminated):
    """Off or on, one row per training image, most outlying first: the copied images are the top rows; the
    manifest and the run record name them."""
    n = len(glob.glob(f"{contaminated['train']}/*.png"))
    for name, model in contaminated["models"].items():
        t = _outliers(model)
        assert len(t["image"]) == n and t["outlier_score"] == sorted(t["outlier_score"], reverse=True)
        assert set(t["image"][:len(KINDS)]) == set(contaminated["copied"]), (name, t["image"][:5])
        manifest = json.load(open(f"{model}/manifest.json"))
        assert "train_outliers.parquet" in manifest["files"]
        top = [r["image"] for r in manifest["stats"]["train_outliers"]["top"]]
        assert set(top[:len(KINDS)]) == set(contaminated["copied"])
        record = read_runs(model, {})[-1]
        assert [r["image"] for r in record["train_outliers"]] == top
    assert set(_outliers(contaminated["models"]["off"])["dropped_fraction"]) == {0.0}


def test_denoising_keeps_their_defects_out_of_the_bank(contaminated, category):
    """With denoising on, the copied images' defect patches are not in the bank: each copied image scores
    well above what it scores with denoising off (where its own defect patches match it), while clean test
    images score as before. The denoise section is recorded only when on."""
    off, on = (Model.load(contaminated["models"][k]) for k in ("off", "on"))
    for path in contaminated["copied"]:
        assert on.predict(path).score > 1.2 * off.predict(path).score, path
    for path in sorted(glob.glob(f"{category}/test/good/*.png"))[:3]:
        a, b = off.predict(path).score, on.predict(path).score
        assert abs(a - b) < 0.1 * a
    t = _outliers(contaminated["models"]["on"])
    share = dict(zip(t["image"], t["dropped_fraction"]))
    assert all(share[p] > 0 for p in contaminated["copied"])
    assert 0.1 < sum(share.values()) / len(share) < 0.2  # denoise.fraction = 0.15 of all patches
    recorded = {k: yaml.safe_load(open(f"{m}/config.yaml")) for k, m in contaminated["models"].items()}
    assert "denoise" not in recorded["off"] and recorded["on"]["denoise"]["enabled"] is True


@pytest.mark.parametrize("form", ["parquet", "text"])
def test_exclude_leaves_the_reviewed_images_out(contaminated, form):
    """fit --exclude with the reviewed rows of train_outliers.parquet (or a text file of relative paths)
    and --reuse: the listed images are not used, the manifest records them, nothing is extracted again."""
    root, old = contaminated["root"], contaminated["models"]["off"]
    rows = pq.read_table(f"{old}/train_outliers.parquet").slice(0, len(KINDS))
    listing = root / f"exclude-{form}"
    if form == "parquet":
        pq.write_table(rows, str(listing))
    else:
        listing.write_text("# reviewed\n" + "\n".join(os.path.basename(u) for u in rows["image"].to_pylist()) + "\n")
    new = str(root / f"model-excluded-{form}")
    assert cli.main(["fit", "--train", contaminated["train"], "--model", new, "--reuse", old,
                     "--exclude", str(listing)] + SMALL) == 0
    manifest = json.load(open(f"{new}/manifest.json"))
    assert sorted(manifest["training"]["excluded"]) == sorted(contaminated["copied"])
    used = pq.read_table(f"{new}/images.parquet")["uri"].to_pylist()
    assert not set(used) & set(contaminated["copied"]) and len(used) == len(_outliers(old)["image"]) - len(KINDS)
    assert manifest["training"]["reused"] == manifest["training"]["used"] == len(used)
    assert set(_outliers(new)["image"]) == set(used)


def test_an_exclude_parquet_without_an_image_column_is_refused(contaminated, tmp_path):
    from patchcore_dist.errors import JobError
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"uri": ["x"]}), str(bad))
    with pytest.raises(JobError, match="'image' column"):
        run_fit(contaminated["train"], str(tmp_path / "m"), load_config(None, SMALL), exclude=str(bad))


def test_two_round_coreset_leaves_the_same_patches_out(ray_local, contaminated, tmp_path):
    """The two-round coreset on Ray gets each part's keep mask: the copied images' defects stay out of the
    bank as in a single-pass fit."""
    model = str(tmp_path / "two")
    manifest = run_fit(contaminated["train"], model, load_config(None, SMALL + [
        "denoise.enabled=true", "coreset.method=two_round", "coreset.parts=2"]))
    info = manifest["stats"]["coreset"]
    assert info["method"] == "two_round" and info["denoised"] == int(0.15 * manifest["training"]["patches"])
    off, two = Model.load(contaminated["models"]["off"]), Model.load(model)
    for path in contaminated["copied"]:
        assert two.predict(path).score > 1.2 * off.predict(path).score, path
