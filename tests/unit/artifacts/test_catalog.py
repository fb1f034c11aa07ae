"""The model catalogue: concurrent updaters lose no entry (local and S3), promotion keeps the previous
version, rollback restores it, a damaged catalogue is refused with its name."""
from __future__ import annotations

import threading

import pytest

from patchcore_dist.artifacts import catalog, storage
from patchcore_dist.errors import JobError


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    """(a models folder, its storage options): local and S3."""
    if request.param == "local":
        return str(tmp_path / "models"), {}
    s3, bucket = request.getfixturevalue("s3"), request.getfixturevalue("bucket")
    return f"s3://{bucket}/catalog/{tmp_path.name}/models", {"endpoint_url": s3}


def _entry(product: str, version: str) -> dict:
    return {"model": f"/m/{product}/{version}", "digest": version * 4, "version": version, "fitted": "t",
            "images": 3, "threshold": 1.0}


def _race(models: str, opts: dict, changes: list) -> None:
    """Run the changes in threads that all read the same catalogue before any writes (a barrier inside
    the first application of each change): every one but one loses its first swap and must retry."""
    barrier = threading.Barrier(len(changes))
    errors, applied = [], []

    def run(change):
        first = [True]

        def gated(cat):
            applied.append(1)
            if first[0]:
                first[0] = False
                barrier.wait()
            return change(cat)
        try:
            catalog.update_catalog(models, gated, opts)
        except Exception as e:  # reported below
            errors.append(e)
    threads = [threading.Thread(target=run, args=(c,)) for c in changes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(applied) > len(changes)  # the race happened: some change was applied again after a lost swap


def test_two_concurrent_creators_of_the_catalogue_lose_no_entry(where):
    models, opts = where
    _race(models, opts, [catalog.promote("brick", _entry("brick", "v1")),
                         catalog.promote("gravel", _entry("gravel", "v1"))])
    products = catalog.read_catalog(models, opts)["products"]
    assert sorted(products) == ["brick", "gravel"]


def test_two_concurrent_updaters_of_one_catalogue_lose_no_entry(where):
    models, opts = where
    catalog.update_catalog(models, catalog.promote("brick", _entry("brick", "v1")), opts)
    _race(models, opts, [catalog.promote("brick", _entry("brick", "v2")),
                         catalog.promote("grass", _entry("grass", "v1")),
                         catalog.promote("gravel", _entry("gravel", "v1"))])
    cat = catalog.read_catalog(models, opts)
    assert cat["format_version"] == 1
    assert sorted(cat["products"]) == ["brick", "grass", "gravel"]
    assert cat["products"]["brick"]["version"] == "v2"
    assert [p["version"] for p in cat["products"]["brick"]["previous"]] == ["v1"]


def test_rollback_restores_the_previous_version_and_refuses_when_there_is_none(tmp_path):
    models = str(tmp_path / "models")
    for v in ("v1", "v2", "v3"):
        catalog.update_catalog(models, catalog.promote("brick", _entry("brick", v)), {})
    e = catalog.read_catalog(models, {})["products"]["brick"]
    assert e["version"] == "v3" and [p["version"] for p in e["previous"]] == ["v2", "v1"]
    catalog.update_catalog(models, catalog.rollback("brick"), {})
    e = catalog.read_catalog(models, {})["products"]["brick"]
    assert (e["version"], e["model"], e["rolled_back_from"]["version"]) == ("v2", "/m/brick/v2", "v3")
    catalog.update_catalog(models, catalog.rollback("brick"), {})
    with pytest.raises(JobError, match="no previous version"):
        catalog.update_catalog(models, catalog.rollback("brick"), {})
    with pytest.raises(JobError, match="no product 'gravel'"):
        catalog.update_catalog(models, catalog.rollback("gravel"), {})


def test_a_refused_version_is_recorded_and_the_current_one_stays(tmp_path):
    models = str(tmp_path / "models")
    catalog.update_catalog(models, catalog.promote("brick", _entry("brick", "v1")), {})
    catalog.update_catalog(models, catalog.refuse("brick", _entry("brick", "v2")), {})
    e = catalog.read_catalog(models, {})["products"]["brick"]
    assert e["version"] == "v1" and e["refused"]["version"] == "v2" and e["previous"] == []


def test_a_damaged_catalogue_is_refused_with_its_name(tmp_path):
    models = str(tmp_path / "models")
    storage.write_bytes(storage.join(models, catalog.CATALOG), b"{not json", )
    with pytest.raises(JobError, match="catalog.json is not a catalogue"):
        catalog.read_catalog(models, {})
    storage.write_bytes(storage.join(models, catalog.CATALOG), b'{"format_version": 9, "products": {}}')
    with pytest.raises(JobError, match="format_version 9"):
        catalog.update_catalog(models, catalog.promote("brick", _entry("brick", "v1")), {})


@pytest.mark.parametrize("name", ["../x", ".hidden", "_validation", "a/b", ""])
def test_unusable_product_names_are_refused(name):
    with pytest.raises(JobError, match="product name"):
        catalog.check_product(name)
