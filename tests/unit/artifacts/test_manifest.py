"""Manifests given as --images (issue 29): a Parquet or CSV table of image URIs, validated like a
listing (error rows for what cannot be read safely), its statistics used as the listing's; and the
listing built in Arrow record batches gives the same entries at any batch size."""
from __future__ import annotations

import datetime as dt
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from patchcore_dist.artifacts import inputs, storage
from patchcore_dist.errors import JobError


def _files(tmp_path):
    root = tmp_path / "archive"
    (root / "a").mkdir(parents=True)
    for rel in ("a/1.png", "a/2.png", "b.jpg"):
        (root / rel).write_bytes(b"x" * 7)
    return root


def _manifest(path, **cols):
    pq.write_table(pa.table(cols), path)
    return str(path)


def _by_uri(table):
    return {r["uri"]: r for r in table.to_pylist()}


def test_entries_are_validated_like_a_listing(tmp_path, caplog):
    root = _files(tmp_path)
    out = tmp_path / "archive" / "out"
    (out / "heatmaps").mkdir(parents=True)
    (out / "heatmaps" / "x.png").write_bytes(b"h")
    (tmp_path / "elsewhere.png").write_bytes(b"e")
    images = [f"{root}/a/1.png", "a/2.png", f"file://{root}/b.jpg", f"{root}/a/1.png",  # relative; file://; twice
              f"{root}/a/../b.jpg", f"{root}/a//1.png", f"{root}/./b.jpg", f"{root}/missing.png",
              f"{out}/heatmaps/x.png", str(tmp_path / "elsewhere.png"), f"{root}/notes.txt", "http://host/x.png"]
    m = _manifest(root / "list.parquet", image=images)
    with caplog.at_level("WARNING"):
        table, given = inputs.manifest_table(m, {}, "images", exclude=str(out), root=str(root))
    assert given == 12 and "more than once" in caplog.text
    rows = _by_uri(table)
    assert table.column("uri").to_pylist() == sorted(rows) and len(rows) == 11  # sorted, the duplicate collapsed
    for ok in ("a/1.png", "a/2.png", "b.jpg"):
        r = rows[f"{root}/{ok}"]
        assert r["error"] is None and r["size"] == 7 and r["ctime"] and r["rel"] == ok and not r["verify"]
        assert r["mtime"] == storage.list_table(f"{root}/{ok}").column("mtime")[0].as_py()  # as the listing has it
    for odd in ("a/../b.jpg", "a//1.png", "./b.jpg"):
        assert "'.' or '..' segment" in rows[f"{root}/{odd}"]["error"]
    assert rows[f"{root}/missing.png"]["error"] == "not found"
    assert "--output" in rows[f"{out}/heatmaps/x.png"]["error"]
    assert rows[str(tmp_path / "elsewhere.png")]["error"] == f"outside --images-root {root}"
    assert rows[f"{root}/notes.txt"]["error"].startswith("not an image file name")
    assert rows["http://host/x.png"]["error"].startswith("unsupported URI scheme")


def test_given_statistics_are_used_and_s3_entries_without_an_etag_are_verified(tmp_path):
    root = _files(tmp_path)
    when = dt.datetime(2026, 3, 1, 12, 0, 0, 250000, tzinfo=dt.timezone.utc)
    m = _manifest(tmp_path / "m.parquet",
                  image=[f"{root}/a/1.png", "s3://bkt/x/1.png", "s3://bkt/x/2.png", "s3://bkt/x//3.png"],
                  size=pa.array([123, 5, None, 1], pa.int64()), mtime=pa.array([when] * 4, pa.timestamp("ms", "UTC")),
                  etag=pa.array([None, '"e1"', None, None], pa.string()), product=["p"] * 4)
    rows = _by_uri(inputs.manifest_table(m, {}, "images", max_bytes=100)[0])
    local = rows[f"{root}/a/1.png"]
    # the manifest's size and mtime stand (the file has 7 bytes); the file is still checked (lstat: its ctime)
    assert local["size"] == 123 and local["mtime"] == when.timestamp() and local["ctime"]
    assert local["error"] == "file is 123 bytes, over the limit image.max_bytes=100 (not read)"
    assert rows["s3://bkt/x/1.png"]["etag"] == '"e1"' and not rows["s3://bkt/x/1.png"]["verify"]
    assert rows["s3://bkt/x/2.png"]["verify"] and rows["s3://bkt/x/2.png"]["error"] is None
    assert rows["s3://bkt/x//3.png"]["error"] == storage.ODD_KEY
    assert rows["s3://bkt/x/1.png"]["rel"] == "bkt/x/1.png"


def test_a_csv_manifest_and_what_is_refused_whole(tmp_path):
    root = _files(tmp_path)
    (tmp_path / "m.csv").write_text(f"image,size\n{root}/a/1.png,\n{root}/b.jpg,\n")
    table, given = inputs.image_table(str(tmp_path / "m.csv"), {}, "images")
    assert given == 2 and table.column("size").to_pylist() == [7, 7] and table.column("error").null_count == 2
    (tmp_path / "bad.csv").write_text("path\n/x.png\n")
    with pytest.raises(JobError, match="no 'image' column"):
        inputs.image_table(str(tmp_path / "bad.csv"), {}, "images")
    with pytest.raises(JobError, match=r"1 rows have no image URI \(rows 2"):
        inputs.image_table(_manifest(tmp_path / "n.parquet", image=[f"{root}/b.jpg", None]), {}, "images")
    with pytest.raises(JobError, match="lists no images"):
        inputs.image_table(_manifest(tmp_path / "e.parquet", image=pa.array([], pa.string())), {}, "images")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(JobError, match="cannot read the manifest"):
        inputs.image_table(str(tmp_path / "broken.parquet"), {}, "images")
    with pytest.raises(JobError, match="manifest not found"):
        inputs.image_table(str(tmp_path / "none.parquet"), {}, "images")
    with pytest.raises(JobError, match="column 'size'"):
        inputs.image_table(_manifest(tmp_path / "s.parquet", image=[f"{root}/b.jpg"], size=["big"]), {}, "images")


def test_a_folder_named_like_a_manifest_is_listed(tmp_path):
    root = tmp_path / "shots.parquet"
    root.mkdir()
    (root / "x.png").write_bytes(b"x")
    table, given = inputs.image_table(str(root), {}, "images")
    assert given is None and table.column("rel").to_pylist() == ["x.png"]
    with pytest.raises(JobError, match="outside --images-root"):
        inputs.image_table(str(root), {}, "images", root=str(tmp_path / "other"))


def test_the_listing_is_the_same_at_any_batch_size(tmp_path, monkeypatch):
    root = _files(tmp_path)
    raw = os.fsencode(root)
    for name in (b"bad\\xff.png", b"bad\xff.png", b"c\xe9.png"):
        open(raw + b"/" + name, "wb").write(name)
    os.symlink("a/1.png", root / "link.png")
    os.symlink(str(tmp_path), root / "up")
    (root / "a" / "blob").write_bytes(b"b")
    os.symlink("a/blob", root / "a" / "blob-link.png")
    whole = storage.list_table(str(root), (".png", ".jpg"))
    monkeypatch.setattr(storage, "LISTING_BATCH", 2)
    batched = storage.list_table(str(root), (".png", ".jpg"))
    assert batched.equals(whole) and whole.num_rows == 7
    assert whole.schema == storage.LISTING_SCHEMA
    assert whole.column("uri").to_pylist() == sorted(whole.column("uri").to_pylist())


def test_given_statistics_never_skip_the_checks(tmp_path):
    """A manifest row with size and mtime used to skip every local check: a link out of --images-root
    (the file, or a folder on its way), a FIFO and a missing file were read. Each is an error row."""
    root = _files(tmp_path)
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "s.png").write_bytes(b"s" * 7)
    os.symlink(secret / "s.png", root / "file-link.png")
    os.symlink(secret, root / "dir-link")
    os.mkfifo(root / "fifo.png")
    images = [f"{root}/a/1.png", f"{root}/file-link.png", f"{root}/dir-link/s.png", f"{root}/fifo.png",
              f"{root}/gone.png"]
    m = _manifest(tmp_path / "m.parquet", image=images, size=pa.array([7] * 5, pa.int64()),
                  mtime=pa.array([1.0] * 5, pa.float64()))
    rows = _by_uri(inputs.manifest_table(m, {}, "images", root=str(root))[0])
    assert rows[f"{root}/a/1.png"]["error"] is None
    for link in ("file-link.png", "dir-link/s.png"):
        assert "leads outside --images-root" in rows[f"{root}/{link}"]["error"]
    assert rows[f"{root}/fifo.png"]["error"] == "not a regular file"
    assert rows[f"{root}/gone.png"]["error"] == "not found"
