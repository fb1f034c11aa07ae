"""First-time rows are appended, re-scored ones merged (issue 29, part 4), and two writers never
leave an image twice in the table: an append is committed only on the version whose log was checked,
and falls back to a MERGE when another commit added data to the model's partition since the plan."""
from __future__ import annotations

import datetime as dt
import json
import os

import pyarrow as pa
import pytest

from patchcore_dist.artifacts import delta, scores

T0 = dt.datetime(2026, 12, 1, 8, 0, tzinfo=dt.timezone.utc)
MODEL = "0123abcd"


def _rows(images, score=1.0, run="r1", at=T0, first_time=None):
    n = len(images)
    t = pa.table({"image": images, "score": pa.array([score] * n, pa.float64()), "model": [MODEL] * n,
                  "digest": [f"d-{i}" for i in images], "size": pa.array([100] * n, pa.int64()), "mtime": [1.0] * n,
                  "ctime": pa.array([5.0] * n, pa.float64()), "etag": pa.nulls(n, pa.string()),
                  "scored_at": pa.array([at] * n, pa.timestamp("s", tz="UTC")), "run": [run] * n,
                  "unchanged": [False] * n})
    return t if first_time is None else t.append_column("first_time", pa.array(first_time))


def _operations(out):
    log = os.path.join(out, "scores", "_delta_log")
    ops = []
    for name in sorted(f for f in os.listdir(log) if f.endswith(".json")):
        for line in open(os.path.join(log, name)):
            a = json.loads(line)
            if "commitInfo" in a:
                ops.append((a["commitInfo"]["operation"], a["commitInfo"].get("patchcore.run")))
    return ops


def _live(out):
    t = scores.read_scores(out)
    images = t.column("image").to_pylist()
    assert len(images) == len(set(images)), f"duplicate rows: {sorted(images)}"
    return {r["image"]: r for r in t.to_pylist()}


def _plan(out, images):
    listing = pa.table({"uri": images, "size": [100] * len(images), "mtime": [1.0] * len(images),
                        "ctime": [5.0] * len(images), "etag": pa.nulls(len(images), pa.string())})
    return scores.previous_rows(out, MODEL, listing, {})


def test_new_images_are_appended_and_rescored_ones_merged(tmp_path):
    out = str(tmp_path / "out")
    scores.open_tables(out, {})
    p = _plan(out, ["/a", "/b"])
    assert p.exists.tolist() == [False, False] and p.version == 0
    m = scores.commit(out, MODEL, _rows(["/a", "/b"], first_time=~p.exists), {}, since=p.version, run="run1")
    assert m == {"appended": 2}
    # a second commit of the same run: its own append does not count as concurrent
    m = scores.commit(out, MODEL, _rows(["/c"], first_time=[True]), {}, since=p.version, run="run1")
    assert m == {"appended": 1}
    assert _operations(out)[-2:] == [("WRITE", "run1"), ("WRITE", "run1")]
    # the next run: /a re-scored (a row exists: MERGE), /d new (appended), an error row of /e counts as a row
    scores.commit(out, MODEL, _rows(["/e"], run="r0").append_column("error", pa.array(["bad"])), {})
    p = _plan(out, ["/a", "/d", "/e"])
    assert p.exists.tolist() == [True, False, True] and p.unchanged.tolist() == [True, False, False]
    m = scores.commit(out, MODEL, _rows(["/a", "/d", "/e"], 2.0, "run2", T0 + dt.timedelta(1), ~p.exists), {},
                      since=p.version, run="run2")
    assert m["appended"] == 1 and m["num_target_rows_updated"] == 2
    live = _live(out)
    assert sorted(live) == ["/a", "/b", "/c", "/d", "/e"] and live["/a"]["score"] == 2.0 and live["/e"]["error"] is None


def test_a_concurrent_insert_of_the_same_image_turns_the_append_into_a_merge(tmp_path):
    out = str(tmp_path / "out")
    scores.open_tables(out, {})
    mine, theirs = _plan(out, ["/x", "/y"]), _plan(out, ["/x"])  # both runs plan before either commits
    scores.commit(out, MODEL, _rows(["/x"], 5.0, "other", T0 + dt.timedelta(2), ~theirs.exists), {},
                  since=theirs.version, run="other")
    m = scores.commit(out, MODEL, _rows(["/x", "/y"], 1.0, "mine", T0, ~mine.exists), {}, since=mine.version, run="mine")
    assert m["appended"] == 0 and m["num_target_rows_inserted"] == 1  # /y inserted by the MERGE, /x matched
    live = _live(out)
    assert live["/x"]["score"] == 5.0 and live["/x"]["run"] == "other"  # the later-scored row stays
    # a commit that did not touch this model's partition (another model) leaves the append possible
    p = _plan(out, ["/z"])
    scores.commit(out, "other", _rows(["/q"]).set_column(2, "model", pa.array(["other"])), {})
    assert scores.commit(out, MODEL, _rows(["/z"], first_time=[True]), {}, since=p.version, run="r")["appended"] == 1


def test_an_append_overtaken_after_its_check_is_checked_again(tmp_path, monkeypatch):
    """The race the version check alone would lose: another run commits the same new image between our
    log check and our append. The append is pinned to the checked version (no commit retries), so it
    fails, the new version is checked, and the rows are merged."""
    out = str(tmp_path / "out")
    scores.open_tables(out, {})
    p = _plan(out, ["/x"])
    real, calls = scores._partition_touched, []

    def check_then_overtaken(*args):
        calls.append(args)
        answer = real(*args)
        if len(calls) == 1:  # right after our check, another writer appends /x (its own check passed)
            scores.commit(out, MODEL, _rows(["/x"], 7.0, "other", T0 + dt.timedelta(3), [True]), {},
                          since=p.version, run="other")
        return answer
    monkeypatch.setattr(scores, "_partition_touched", check_then_overtaken)
    m = scores.commit(out, MODEL, _rows(["/x"], 1.0, "mine", T0, [True]), {}, since=p.version, run="mine")
    assert m["appended"] == 0 and len(calls) >= 3  # ours checked twice (the other writer's once, inside)
    live = _live(out)
    assert list(live) == ["/x"] and live["/x"]["run"] == "other"


def test_a_merge_that_read_before_an_append_conflicts_with_it(tmp_path):
    """What the design relies on in delta-rs: a MERGE planned on a version older than a concurrent
    append into its partition fails to commit (and our commit runs it again on the new version)."""
    from deltalake import write_deltalake
    from deltalake.exceptions import CommitFailedError
    out = str(tmp_path / "out")
    scores.open_tables(out, {})
    stale = delta.load(scores.scores_uri(out), {})
    write_deltalake(scores.scores_uri(out), scores._conform(_rows(["/x"]), scores._stored(scores.SCORE_SCHEMA)),
                    mode="append")
    source = scores._conform(_rows(["/x"]), scores._stored(scores.SCORE_SCHEMA))
    with pytest.raises(CommitFailedError):
        stale.merge(source, predicate=f"t.model = '{MODEL}' AND t.image = s.image", source_alias="s",
                    target_alias="t").when_not_matched_insert_all().execute()
