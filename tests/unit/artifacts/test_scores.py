"""The score table as a Delta Lake table: MERGE commits, snapshots and time travel, conflicts,
foreign and corrupt files, the incremental plan's comparison, the conversion of Parquet parts,
and reading it with polars. No Ray: commits are driven directly, one at a time."""
import datetime as dt
import glob
import logging
import os
import shutil
import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from patchcore_dist.artifacts import delta, scores
from patchcore_dist.errors import JobError, StorageError

T0 = dt.datetime(2026, 12, 1, 8, 0, tzinfo=dt.timezone.utc)
MODEL = "0123abcd"


def _rows(images, score=1.0, run="r1", at=T0, digest=None, size=100, ctime=5.0, etag=None, unchanged=False,
          model=MODEL):
    n = len(images)
    return pa.table({
        "image": images, "score": pa.array([score] * n, pa.float64()), "model": [model] * n,
        "digest": [digest or f"d-{i}" for i in images], "size": pa.array([size] * n, pa.int64()),
        "mtime": [1.0] * n, "ctime": pa.array([ctime] * n, pa.float64()), "etag": pa.array([etag] * n, pa.string()),
        "scored_at": pa.array([at] * n, pa.timestamp("s", tz="UTC")), "run": [run] * n,
        "unchanged": [unchanged] * n})


def _live(out, **kw):
    t = scores.read_scores(out, **kw)
    return {r["image"]: r for r in t.to_pylist()}, t


def test_merge_commits_keep_one_live_row_per_image_and_earlier_versions_readable(tmp_path):
    out = str(tmp_path / "out")
    scores.open_tables(out, {})
    scores.commit(out, MODEL, _rows(["/a", "/b", "/c"], 1.0, "r1"), {})
    v1 = delta.load(scores.scores_uri(out), {}).version()
    later = T0 + dt.timedelta(hours=1)
    scores.commit(out, MODEL, pa.concat_tables([
        _rows(["/b", "/d"], 2.0, "r2", at=later),                     # re-scored and new
        _rows(["/c"], None, "r2", at=later, size=999, unchanged=True),  # read again, same digest: new stats only
        _rows(["/a"], 9.0, "r0", at=T0 - dt.timedelta(hours=1)),       # scored before the live row: ignored
    ]), {})
    live, table = _live(out)
    assert table.schema == scores.SCORE_SCHEMA and table.num_rows == 4
    assert {k: (r["score"], r["run"]) for k, r in live.items()} == {
        "/a": (1.0, "r1"), "/b": (2.0, "r2"), "/c": (1.0, "r1"), "/d": (2.0, "r2")}
    assert live["/c"]["size"] == 999 and live["/c"]["scored_at"] == T0
    # which score did /b have before? the earlier version says so, until a vacuum
    before, _ = _live(out, version=v1)
    assert set(before) == {"/a", "/b", "/c"} and before["/b"]["score"] == 1.0
    # another model's rows never mix with these
    scores.commit(out, "other", _rows(["/a"], 5.0, model="other"), {})
    assert scores.read_scores(out, model=MODEL).num_rows == 4 and scores.read_scores(out).num_rows == 5


def test_polars_reads_the_same_rows(tmp_path):
    pl = pytest.importorskip("polars")
    out = str(tmp_path / "out")
    scores.open_tables(out, {})
    scores.commit(out, MODEL, _rows(["/a", "/b"], 1.0), {})
    scores.commit(out, MODEL, _rows(["/b", "/c"], 2.0, "r2", at=T0 + dt.timedelta(1)), {})
    frame = pl.read_delta(scores.scores_uri(out))
    ours = scores.read_scores(out)
    assert sorted(zip(frame["image"].to_list(), frame["score"].to_list(), frame["model"].to_list())) == \
        sorted(zip(*(ours.column(c).to_pylist() for c in ("image", "score", "model"))))


def test_a_reader_between_commits_never_sees_a_duplicate_nor_loses_a_row(tmp_path):
    """Commits driven one by one (overlapping image sets, compactions in between): every version a
    reader can see has one row per image and every image committed before."""
    out = str(tmp_path / "out")
    scores.open_tables(out, {})
    committed = set()
    held = None
    for k in range(8):
        images = [f"/img/{i:03d}" for i in range(k * 3, k * 3 + 6)]  # half of them already committed
        scores.commit(out, MODEL, _rows(images, float(k), f"r{k}", at=T0 + dt.timedelta(minutes=k)), {})
        committed |= set(images)
        if k == 3:
            held = delta.load(scores.scores_uri(out), {})  # a reader that keeps its snapshot
        if k == 5:
            delta.compact(delta.load(scores.scores_uri(out), {}), scores.scores_uri(out))
        table = scores.read_scores(out)
        names = table.column("image").to_pylist()
        assert len(names) == len(set(names)) and set(names) == committed
    assert held.to_pyarrow_table().num_rows == 15  # its files are still there: no vacuum yet


def _conflicting_writer(monkeypatch, out, times):
    """Make the next ``times`` table loads of our commit be overtaken by another writer's commit
    of overlapping images, deterministically between our load and our MERGE."""
    real_load = delta.load
    calls = {"n": 0}

    def load(uri, opts, version=None):
        t = real_load(uri, opts, version)
        if uri == scores.scores_uri(out) and t is not None and calls["n"] < times:
            calls["n"] += 1
            other = real_load(uri, opts)
            src = scores._conform(_rows([f"/other/{calls['n']}", "/shared"], 7.0, "rx"),
                                  scores._stored(scores.SCORE_SCHEMA).append(pa.field("unchanged", pa.bool_())))
            other.merge(src, predicate="t.model = s.model AND t.image = s.image", source_alias="s",
                        target_alias="t").when_matched_update_all(except_cols=["unchanged"]) \
                .when_not_matched_insert_all(except_cols=["unchanged"]).execute()
        return t
    monkeypatch.setattr(delta, "load", load)
    return calls


def test_a_conflicting_concurrent_commit_is_retried(tmp_path, monkeypatch, caplog):
    out = str(tmp_path / "out")
    scores.open_tables(out, {})
    calls = _conflicting_writer(monkeypatch, out, times=2)
    with caplog.at_level(logging.INFO):
        scores.commit(out, MODEL, _rows(["/shared", "/mine"], 1.0, "r1", at=T0 + dt.timedelta(1)), {})
    assert calls["n"] == 2 and caplog.text.count("a concurrent commit came first") == 2
    monkeypatch.undo()
    live, table = _live(out)
    assert table.num_rows == 4 and set(live) == {"/shared", "/mine", "/other/1", "/other/2"}
    assert live["/shared"]["run"] == "r1"  # scored later than the other writer's row


def test_a_commit_that_is_always_overtaken_fails_with_a_clear_message(tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    scores.open_tables(out, {})
    monkeypatch.setattr(delta, "COMMIT_ATTEMPTS", 2)
    _conflicting_writer(monkeypatch, out, times=99)
    with pytest.raises(JobError, match="gave up after 2 attempts.*run the job again"):
        scores.commit(out, MODEL, _rows(["/shared"], 1.0), {})


def test_foreign_and_leftover_files_change_nothing_and_vacuum_removes_only_the_leftover(tmp_path):
    out = str(tmp_path / "out")
    scores.open_tables(out, {})
    scores.commit(out, MODEL, _rows(["/a", "/b"], 1.0), {})
    listing = pa.table({"uri": ["/a", "/b"], "size": [100, 100], "mtime": [1.0, 1.0], "ctime": [5.0, 5.0],
                        "etag": pa.nulls(2, pa.string())})
    before, plan_before = scores.read_scores(out), scores.previous(out, MODEL, listing, {})
    part = glob.glob(os.path.join(out, "scores", f"model={MODEL}", "*.parquet"))[0]
    leftover = os.path.join(os.path.dirname(part), f"part-00000-{uuid.uuid4()}-c000.snappy.parquet")
    shutil.copy(part, leftover)  # a crashed writer's data file: same rows, never committed
    foreign = [os.path.join(out, "scores", f"model={MODEL}", "notes.parquet"), os.path.join(out, "scores", "README.txt")]
    for f in foreign:
        with open(f, "wb") as fh:
            fh.write(b"not a parquet file")
    assert scores.read_scores(out).equals(before)
    plan = scores.previous(out, MODEL, listing, {})
    assert np.array_equal(plan[0], plan_before[0]) and plan[0].all()
    old = time.time() - 2 * 3600
    for f in [leftover] + foreign:
        os.utime(f, (old, old))
    scores.maintain(out, {}, vacuum_hours=1)
    assert not os.path.exists(leftover) and all(os.path.exists(f) for f in foreign)  # a user's files stay
    assert scores.read_scores(out).equals(before)


def test_a_corrupt_data_file_is_named_with_the_recovery(tmp_path):
    out = str(tmp_path / "out")
    scores.open_tables(out, {})
    scores.commit(out, MODEL, _rows(["/a", "/b"], 1.0), {})
    scores.commit(out, "other", _rows(["/c"], 1.0, model="other"), {})
    part = glob.glob(os.path.join(out, "scores", f"model={MODEL}", "*.parquet"))[0]
    with open(part, "r+b") as f:
        f.truncate(os.path.getsize(part) // 2)
    listing = pa.table({"uri": ["/a"], "size": [100], "mtime": [1.0], "ctime": [5.0], "etag": pa.nulls(1, pa.string())})
    for read in (lambda: scores.read_scores(out), lambda: scores.previous(out, MODEL, listing, {}),
                 lambda: scores.commit(out, MODEL, _rows(["/a"], 2.0, "r2", at=T0 + dt.timedelta(1)), {})):
        with pytest.raises(StorageError, match=rf"{os.path.basename(part)}.*--repair"):
            read()
    # the recovery step the message gives: delete the file, repair; the other rows stay
    os.remove(part)
    scores.maintain(out, {}, repair=True)
    assert scores.read_scores(out).column("image").to_pylist() == ["/c"]


def test_the_plan_compares_size_mtime_ctime_and_etag(tmp_path):
    out = str(tmp_path / "out")
    scores.open_tables(out, {})
    images = ["/a", "/b", "/c", "/d", "/e"]
    scores.commit(out, MODEL, pa.concat_tables([_rows(images[:3], ctime=5.0), _rows(images[3:], ctime=None, etag='"e1"')]),
                  {})
    failed = _rows(["/f"], None)
    failed = failed.append_column("error", pa.array(["truncated"]))
    scores.commit(out, MODEL, failed, {})
    listing = pa.table({"uri": images + ["/f", "/g"], "size": [100, 100, 101, 100, 100, 100, 100], "mtime": [1.0] * 7,
                        "ctime": [5.0, 6.0, 5.0, None, None, None, None],   # /b: content replaced, mtime set back
                        "etag": [None, None, None, '"e1"', '"e2"', None, None]},  # /e: object overwritten
                       schema=pa.schema([("uri", pa.string()), ("size", pa.int64()), ("mtime", pa.float64()),
                                         ("ctime", pa.float64()), ("etag", pa.string())]))
    unchanged, known = scores.previous(out, MODEL, listing, {})
    assert unchanged.tolist() == [True, False, False, True, False, False, False]
    assert known.to_pylist() == [None, "d-/b", "d-/c", None, "d-/e", None, None]  # /f failed: no digest to trust


def test_parquet_parts_of_an_earlier_version_are_converted_with_every_row(tmp_path):
    out = str(tmp_path / "out")
    folder = os.path.join(out, "scores", MODEL)
    os.makedirs(folder)
    old = pa.schema([f for f in scores.SCORE_SCHEMA if f.name not in ("ctime", "etag", "warning", "run")]
                    + [pa.field(n, t) for n, t in scores.GRID_FIELDS])

    def part(name, images, score):
        n = len(images)
        cols = {"image": images, "score": [score] * n, "model": [MODEL] * n, "digest": ["d"] * n, "size": [1] * n,
                "mtime": [1.0] * n, "scored_at": [T0] * n, "grid_h": [1] * n, "grid_w": [2] * n,
                "patch_scores": [[score, score]] * n}
        pq.write_table(pa.Table.from_pydict({f.name: cols.get(f.name, [None] * n) for f in old}, schema=old),
                       os.path.join(folder, name))
    part("part-20261101T000000-aaaaaa-00000.parquet", ["/a", "/b"], 1.0)
    part("part-20261102T000000-bbbbbb-00000.parquet", ["/b"], 2.0)  # the newer row of /b
    with pytest.raises(StorageError, match=f"patchcore maintain --output {out}"):
        scores.read_scores(out)
    scores.maintain(out, {})
    live, table = _live(out, patch_scores=True)
    assert {k: r["score"] for k, r in live.items()} == {"/a": 1.0, "/b": 2.0}
    assert live["/b"]["patch_scores"] == [2.0, 2.0] and table.schema == scores.table_schema(True)
    assert not os.path.exists(folder)


def test_listing_gives_ctime_locally_and_the_etag_on_s3(tmp_path, s3, bucket):
    import boto3
    from patchcore_dist.artifacts import storage
    (tmp_path / "x.png").write_bytes(b"12345")
    [e] = storage.list_entries(str(tmp_path))
    assert e["ctime"] == os.stat(tmp_path / "x.png").st_ctime and e["etag"] is None
    storage.write_bytes(f"s3://{bucket}/etag-listing/x.png", b"12345", endpoint_url=s3)
    [e] = storage.list_entries(f"s3://{bucket}/etag-listing", endpoint_url=s3)
    head = boto3.client("s3", endpoint_url=s3).head_object(Bucket=bucket, Key="etag-listing/x.png")
    assert e["etag"] == head["ETag"] and e["ctime"] is None and e["size"] == 5
    [single] = storage.list_entries(f"s3://{bucket}/etag-listing/x.png", endpoint_url=s3)
    assert single["uri"] == f"s3://{bucket}/etag-listing/x.png" and single["etag"] == head["ETag"]
    with pytest.raises(FileNotFoundError):
        storage.list_entries(f"s3://{bucket}/no/such/prefix", endpoint_url=s3)


def test_the_table_on_s3(s3, bucket):
    pl = pytest.importorskip("polars")
    out, opts = f"s3://{bucket}/table-test", {"endpoint_url": s3}
    scores.open_tables(out, opts)
    scores.commit(out, MODEL, _rows(["s3://x/a", "s3://x/b"], 1.0), opts)
    scores.commit(out, MODEL, _rows(["s3://x/b"], 2.0, "r2", at=T0 + dt.timedelta(1)), opts)
    live, _ = _live(out, opts=opts)
    assert {k: r["score"] for k, r in live.items()} == {"s3://x/a": 1.0, "s3://x/b": 2.0}
    uri, so = delta.location(scores.scores_uri(out), opts)
    assert sorted(pl.read_delta(uri, storage_options=so)["score"].to_list()) == [1.0, 2.0]


def _grid(images, run, at, value):
    n = len(images)
    return pa.table({"image": images, "model": [MODEL] * n, "run": [run] * n,
                     "scored_at": pa.array([at] * n, pa.timestamp("s", tz="UTC")),
                     "grid_h": pa.array([1] * n, pa.int32()), "grid_w": pa.array([2] * n, pa.int32()),
                     "patch_scores": pa.array([[value, value]] * n, pa.list_(pa.float32()))})


def test_grids_are_read_with_their_rows_and_unused_ones_dropped_by_maintenance(tmp_path):
    out = str(tmp_path / "out")
    old = dt.datetime.now(dt.timezone.utc).replace(microsecond=0) - dt.timedelta(days=10)
    scores.open_tables(out, {})
    scores.commit(out, MODEL, _rows(["/a", "/b"], 1.0, "r1", at=old), {}, grids=_grid(["/a", "/b"], "r1", old, 1.0))
    now = old + dt.timedelta(days=10)
    scores.commit(out, MODEL, _rows(["/a"], 2.0, "r2", at=now), {}, grids=_grid(["/a"], "r2", now, 2.0))
    scores.commit(out, MODEL, _rows(["/c"], 3.0, "r3", at=now), {}, grids=_grid(["/c"], "r3", now, 3.0))
    live, _ = _live(out, model=MODEL, patch_scores=True)
    assert {k: r["patch_scores"] for k, r in live.items()} == {"/a": [2.0, 2.0], "/b": [1.0, 1.0], "/c": [3.0, 3.0]}
    done = scores.maintain(out, {})  # /a's grid of r1 is superseded and 10 days old
    assert done[scores.grids_uri(out)]["grids_dropped"] == 1
    assert _live(out, model=MODEL, patch_scores=True)[0] == live


def test_a_table_written_before_a_column_existed_gains_it(tmp_path):
    """Schema evolution: a score table created with the schema of an earlier version (no
    normalized_score) gets the column on the next run; its old rows read it as null, new rows carry it."""
    out = str(tmp_path / "out")
    old_schema = pa.schema([f for f in scores._stored(scores.SCORE_SCHEMA) if f.name != "normalized_score"])
    delta.create(scores.scores_uri(out), {}, old_schema, ["model"])
    scores.commit(out, MODEL, _rows(["a.png", "b.png"]), {})  # rows into the old table
    before = {f.name for f in delta.load(scores.scores_uri(out), {}).schema().fields}
    scores.open_tables(out, {})  # what the next run does first
    after = {f.name for f in delta.load(scores.scores_uri(out), {}).schema().fields}
    assert "normalized_score" not in before and "normalized_score" in after
    new = _rows(["c.png"], run="r2", at=T0 + dt.timedelta(hours=1)).append_column(
        "normalized_score", pa.array([0.75]))
    scores.commit(out, MODEL, new, {})
    live, table = _live(out)
    assert table.schema == scores.SCORE_SCHEMA
    assert live["a.png"]["normalized_score"] is None and live["c.png"]["normalized_score"] == 0.75
    assert delta.load(scores.scores_uri(out), {}).protocol().min_reader_version == 1


def test_top_rows_keeps_the_best_k_of_each_batch_and_counts_every_match(tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    scores.open_tables(out, {})
    rng = np.random.default_rng(0)
    values = rng.permutation(np.arange(100, dtype=np.float64))
    for part in np.array_split(np.arange(100), 4):  # four commits: several data files
        rows = pa.concat_tables([_rows([f"/img{i:03d}"], float(values[i])) for i in part])
        scores.commit(out, MODEL, rows, {})
    scores.commit(out, "other", _rows(["/x"], 1000.0, model="other"), {})  # another model's row: never read
    monkeypatch.setattr(scores, "PLAN_BATCH_ROWS", 7)  # many batches
    (top, n), (low, m), (none, k) = scores.top_rows(out, {}, MODEL, ["image", "score", "normalized_score", "nope"], [
        (pc.field("score") >= 50, [("score", "descending")], 5), (pc.field("score") < 10, [("image", "ascending")], 3),
        (pc.field("score") > 500, [("score", "descending")], 5)])
    assert (n, m, k) == (50, 10, 0) and top.column_names == ["image", "score", "normalized_score"]  # no "nope"
    name = {float(v): f"/img{i:03d}" for i, v in enumerate(values)}
    assert top.column("score").to_pylist() == [99.0, 98.0, 97.0, 96.0, 95.0]
    assert top.column("image").to_pylist() == [name[v] for v in (99.0, 98.0, 97.0, 96.0, 95.0)]
    assert low.column("image").to_pylist() == sorted(name[float(v)] for v in range(10))[:3]
    assert none.num_rows == 0
    [(empty, n)] = scores.top_rows(str(tmp_path / "nothing"), {}, MODEL, ["image", "score"],
                                   [(pc.field("score") > 0, [("score", "descending")], 5)])
    assert n == 0 and empty.column_names == ["image", "score"]
