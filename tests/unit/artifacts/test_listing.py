"""Listing hostile folders and buckets: every file once, no loop, nothing outside the root, no file
the job cannot read by its name without an error, nothing of the job's own output."""
from __future__ import annotations

import os
import socket

import pytest

from patchcore_dist.artifacts import storage
from patchcore_dist.artifacts.inputs import list_images
from patchcore_dist.errors import JobError


def _tree(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    for rel in ("a.png", "sub/b.png", "sub/c.jpg", "d.png"):
        (root / rel).write_bytes(b"x" * 10)
    return root


def _rels(root, **kw):
    return {e["rel"]: e for e in storage.list_entries(str(root), (".png", ".jpg"), **kw)}


def test_a_name_that_is_not_utf8_gets_an_entry_that_names_it(tmp_path):
    root = _tree(tmp_path)
    open(os.fsencode(root) + b"/latin1-\xe9\xff.png", "wb").write(b"x")
    os.mkdir(os.fsencode(root) + b"/dir-\xe9")
    open(os.fsencode(root) + b"/dir-\xe9/e.png", "wb").write(b"x")
    rels = _rels(root)
    assert rels["latin1-\\xe9\\xff.png"]["error"].startswith("file name is not valid UTF-8")
    assert rels["dir-\\xe9/e.png"]["error"].startswith("file name is not valid UTF-8")
    assert all(rels[r]["error"] is None for r in ("a.png", "sub/b.png", "sub/c.jpg", "d.png"))
    assert all(e["uri"].encode("utf-8") for e in rels.values())  # every URI can be stored


def test_directory_links_never_loop_and_never_leave_the_root(tmp_path, caplog):
    root = _tree(tmp_path)
    (root / "loop").mkdir()
    os.symlink("..", root / "loop" / "up")
    os.symlink("..", root / "loop" / "again")
    os.symlink(root / "sub", root / "sub-again")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(b"secret")
    os.symlink(outside, root / "escape")
    with caplog.at_level("WARNING"):
        rels = _rels(root)
    assert sorted(rels) == ["a.png", "d.png", "sub/b.png", "sub/c.jpg"]  # each file once
    assert "'escape' not followed (it leads out of the input root)" in caplog.text
    assert "'loop/up' not followed (its folder is listed under its real path)" in caplog.text


def test_file_links(tmp_path):
    root = _tree(tmp_path)
    (root / "blob.bin").write_bytes(b"y" * 3)
    (tmp_path / "outside.png").write_bytes(b"secret")
    os.symlink("a.png", root / "link-to-a.png")            # a is listed already
    os.symlink("blob.bin", root / "named.png")              # its target is not listed under an image name
    os.symlink("named.png", root / "named-again.png")       # the same target once more
    os.symlink(tmp_path / "outside.png", root / "out.png")  # out of the root
    os.symlink("missing.png", root / "broken.png")
    rels = _rels(root)
    assert "link-to-a.png" not in rels
    # two links to one file not listed under its own name: the first (in name order) is listed
    assert "named.png" not in rels and rels["named-again.png"]["error"] is None and rels["named-again.png"]["size"] == 3
    assert rels["out.png"]["error"] == "symbolic link to a file outside the input root: not followed"
    assert rels["broken.png"]["error"].startswith("broken symbolic link")


def test_fifos_and_sockets_are_skipped_with_a_log_line(tmp_path, caplog):
    root = _tree(tmp_path)
    os.mkfifo(root / "fifo.png")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(root / "sock.png"))
        with caplog.at_level("WARNING"):
            rels = _rels(root)
    assert "fifo.png" not in rels and "sock.png" not in rels and len(rels) == 4
    assert "skipped 'fifo.png': not a regular file (FIFO)" in caplog.text
    assert "skipped 'sock.png': not a regular file (socket)" in caplog.text


def test_the_output_inside_the_input_is_left_out(tmp_path):
    root = _tree(tmp_path)
    (root / "out" / "heatmaps").mkdir(parents=True)
    (root / "out" / "heatmaps" / "a.png.png").write_bytes(b"heat")
    (root / "outer.png").write_bytes(b"x")  # a sibling whose name starts like the output's
    files = list_images(str(root), {}, "images", exclude=str(root / "out"))
    assert sorted(e["rel"] for e in files) == ["a.png", "d.png", "outer.png", "sub/b.png", "sub/c.jpg"]
    assert len(list_images(str(root), {}, "images", exclude=f"file://{root}/sub")) == 4
    with pytest.raises(JobError, match="is the images location itself"):
        list_images(str(root), {}, "images", exclude=str(root) + "/")


def test_a_file_over_max_bytes_is_refused_from_its_size(tmp_path, monkeypatch):
    root = _tree(tmp_path)
    with open(root / "sparse.png", "wb") as f:
        f.truncate(1_500_000_000)  # 1.5 GB, sparse: no disk used
    monkeypatch.setattr(storage, "read_bytes", lambda *a, **k: pytest.fail("the listing read a file"))
    files = {e["rel"]: e for e in list_images(str(root), {}, "images", max_bytes=1000)}
    assert files["sparse.png"]["error"] == ("file is 1500000000 bytes, over the limit image.max_bytes=1000 "
                                            "(not read)")
    assert files["a.png"]["error"] is None


def test_s3_keys_that_cannot_be_read_exactly_are_errors_and_the_output_is_left_out(s3, bucket):
    opts = {"endpoint_url": s3}
    base = f"s3://{bucket}/listing"
    for key in ("a/b.png", "a//b.png", "a/./b.png", "a/../b.png", "/a/b.png", "out/heatmaps/a/b.png.png"):
        import boto3  # pyarrow itself cannot write these keys either
        boto3.client("s3", endpoint_url=s3).put_object(Bucket=bucket, Key=f"listing/{key}", Body=key.encode())
    files = {e["rel"]: e for e in list_images(base, opts, "images", exclude=f"{base}/out")}
    assert sorted(files) == ["/a/b.png", "a/../b.png", "a/./b.png", "a//b.png", "a/b.png"]
    assert len({e["uri"] for e in files.values()}) == 5 and files["/a/b.png"]["uri"] == f"{base}//a/b.png"
    assert files["a/b.png"]["error"] is None
    assert storage.read_bytes(files["a/b.png"]["uri"], **opts) == b"a/b.png"
    for odd in ("/a/b.png", "a/../b.png", "a/./b.png", "a//b.png"):
        assert "cannot address exactly" in files[odd]["error"]


def test_names_are_logged_escaped(tmp_path, caplog):
    root = _tree(tmp_path)
    os.mkfifo(root / "x\n12:00:00 INFO forged line.png")
    os.symlink("..", root / "up\rforged")
    with caplog.at_level("WARNING"):
        _rels(root)
    assert "'x\\n12:00:00 INFO forged line.png'" in caplog.text and "'up\\rforged'" in caplog.text
    assert "\n12:00:00 INFO forged" not in caplog.text and "\rforged" not in caplog.text


def test_a_literal_escape_beside_the_name_it_spells_are_two_entries(tmp_path):
    """``bad\\xff.png`` (a valid name with a backslash) and ``bad<0xff>.png`` (not UTF-8) once had one
    URI: the plan failed on every run. The escape is injective (a backslash of a name that is not
    UTF-8 is doubled) and an escaped name that another file has gets a hash of its bytes."""
    root = tmp_path / "root"
    root.mkdir()
    raw = os.fsencode(root)
    for name in (b"bad\\xff.png", b"bad\xff.png", b"bad\\\xff.png", b"bad\\xff\xff.png", b"bad\xff\xff.png"):
        open(raw + b"/" + name, "wb").write(name)
    entries = storage.list_entries(str(root), (".png",))
    uris = [e["uri"] for e in entries]
    assert len(entries) == 5 and len(set(uris)) == 5 and uris == sorted(uris)
    rels = {e["rel"]: e for e in entries}
    assert rels["bad\\xff.png"]["error"] is None  # the valid name: its own path, read as usual
    assert open(rels["bad\\xff.png"]["uri"], "rb").read() == b"bad\\xff.png"
    odd = [e for e in entries if e["error"]]
    assert len(odd) == 4 and all(e["error"].startswith("file name is not valid UTF-8") for e in odd)
    assert {"bad\\\\\\xff.png", "bad\\\\xff\\xff.png", "bad\\xff\\xff.png"} <= set(rels)  # '\\' doubled
    [hashed] = [r for r in rels if r.startswith("bad\\xff~")]  # <0xff> spells the valid name: hashed
    assert hashed.endswith(".png") and "another file" in rels[hashed]["error"]
    assert storage.list_entries(str(root), (".png",)) == entries  # the same entries on every listing


def test_the_plan_and_the_table_keep_one_row_per_file_of_such_a_folder(tmp_path):
    import datetime as dt

    import pyarrow as pa

    from patchcore_dist.artifacts import scores
    root = tmp_path / "root"
    root.mkdir()
    open(os.fsencode(root) + b"/bad\\xff.png", "wb").write(b"a")
    open(os.fsencode(root) + b"/bad\xff.png", "wb").write(b"b")
    entries = list_images(str(root), {}, "images")
    listing = pa.Table.from_pylist([{k: e[k] for k in ("uri", "size", "mtime", "ctime", "etag")} for e in entries])
    out = str(tmp_path / "out")
    scores.open_tables(out, {})
    unchanged, known = scores.previous(out, "m1", listing, {})  # the first run
    assert unchanged.tolist() == [False, False]
    n = len(entries)
    at = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    scores.commit(out, "m1", pa.table({
        "image": [e["uri"] for e in entries], "model": ["m1"] * n, "error": [e["error"] for e in entries],
        "size": [e["size"] for e in entries], "mtime": [e["mtime"] for e in entries],
        "ctime": [e["ctime"] for e in entries], "digest": ["d"] * n, "run": ["r"] * n,
        "scored_at": pa.array([at] * n, pa.timestamp("s", tz="UTC")), "unchanged": [False] * n}), {})
    assert sorted(scores.read_scores(out).column("image").to_pylist()) == sorted(listing.column("uri").to_pylist())
    # the second run: the valid name's row is found; the other one's error row is retried, as any error
    assert scores.previous(out, "m1", listing, {})[0].tolist() == [True, False]


def test_the_plan_survives_a_listing_with_one_uri_twice(tmp_path):
    """Whatever the listing: a duplicate URI gets the answer of its first copy, no ValueError."""
    import datetime as dt

    import pyarrow as pa

    from patchcore_dist.artifacts import scores
    out = str(tmp_path / "out")
    scores.open_tables(out, {})
    at = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    scores.commit(out, "m1", pa.table({"image": ["/a", "/b"], "model": ["m1"] * 2, "size": [1, 1],
                                       "mtime": [1.0, 1.0], "digest": ["da", "db"], "run": ["r", "r"],
                                       "scored_at": pa.array([at] * 2, pa.timestamp("s", tz="UTC")),
                                       "unchanged": [False] * 2}), {})
    listing = pa.table({"uri": ["/a", "/a", "/b", "/b", "/c"], "size": [1, 1, 2, 2, 1], "mtime": [1.0] * 5,
                        "ctime": pa.nulls(5, pa.float64()), "etag": pa.nulls(5, pa.string())})
    unchanged, known = scores.previous(out, "m1", listing, {})
    assert unchanged.tolist() == [True, True, False, False, False]
    assert known.to_pylist() == [None, None, "db", "db", None]
    with pytest.raises(ValueError, match="sorted"):
        scores.previous(out, "m1", listing.take([4, 0]), {})


def test_a_name_shaped_like_a_hashed_key_gets_its_own_key():
    """`a b.png` becomes `a_b-<hash>.png`; a file literally named so used to share that heatmap key."""
    from patchcore_dist.artifacts.storage import safe_relpath
    hashed = safe_relpath("a b.png")
    assert hashed != "a b.png" and safe_relpath(hashed) != hashed
    names = ["a b.png", hashed, safe_relpath(hashed), "x/y.png", "a_b.png"]
    assert len({safe_relpath(n) for n in names}) == len(names)
    assert safe_relpath("x/y.png") == "x/y.png"  # ordinary names keep their path
