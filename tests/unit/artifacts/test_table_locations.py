"""Score tables at locations whose path needs escaping in a URL (a space, '#', '?', '+', a non-ASCII
letter), locally and on S3: repeated commits, the incremental plan, reads, compaction and a vacuum
all find the table's files. A '%' followed by two hex digits is refused up front: delta-rs reads
such a table from another path than it writes it to."""
import datetime as dt
import os

import pyarrow as pa
import pytest

from patchcore_dist.artifacts import delta, scores
from patchcore_dist.errors import StorageError

from test_scores import MODEL, T0, _rows

ODD = "out dir #1 ä?x+y"


def _listing(images):
    n = len(images)
    return pa.table({"uri": images, "size": pa.array([100] * n, pa.int64()), "mtime": [1.0] * n,
                     "ctime": pa.array([5.0] * n, pa.float64()), "etag": pa.nulls(n, pa.string())})


def _commits_and_reads(out, opts):
    """Three runs' worth of commits, each followed by what the next run reads (plan, rows), then
    maintenance; every step sees the rows committed before."""
    scores.open_tables(out, opts)
    images = []
    for k in range(3):
        scores.open_tables(out, opts)  # what each run does first
        images = images + [f"/img/{k}-{i}.png" for i in range(2)]
        unchanged, known = scores.previous(out, MODEL, _listing(images), opts)
        assert unchanged.tolist() == [True] * (2 * k) + [False, False]  # the earlier rows are found
        scores.commit(out, MODEL, _rows(images[-2:], float(k), f"r{k}", at=T0 + dt.timedelta(hours=k)), opts)
        table = scores.read_scores(out, opts)
        assert sorted(table.column("image").to_pylist()) == images
    delta.compact(delta.load(scores.scores_uri(out), opts), scores.scores_uri(out))
    done = scores.maintain(out, opts, vacuum_hours=1)
    assert done[scores.scores_uri(out)]["vacuumed"] == []  # nothing old enough yet
    assert sorted(scores.read_scores(out, opts, model=MODEL).column("image").to_pylist()) == images
    assert scores.previous(out, MODEL, _listing(images), opts)[0].all()


def test_a_local_output_with_a_space_a_hash_and_a_non_ascii_letter(tmp_path):
    out = str(tmp_path / ODD)
    _commits_and_reads(out, {})
    assert os.path.isdir(os.path.join(out, "scores", "_delta_log"))  # the table is where we said
    assert sorted(os.listdir(tmp_path)) == [ODD]


def test_an_s3_prefix_with_a_space_a_hash_and_a_non_ascii_letter(s3, bucket):
    import boto3
    import uuid
    own = f"odd-{uuid.uuid4().hex[:8]}"  # the session's bucket is shared with other tests' outputs
    out, opts = f"s3://{bucket}/{own}/{ODD}/out", {"endpoint_url": s3}
    _commits_and_reads(out, opts)
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3).list_objects_v2(
        Bucket=bucket, Prefix=own)["Contents"]]
    assert keys and all(k.startswith(f"{own}/{ODD}/out/scores/") for k in keys)


def test_a_percent_escape_in_a_local_output_is_refused_before_anything_is_written(tmp_path):
    out = str(tmp_path / "run%41")
    with pytest.raises(StorageError, match=r"run%41.*'%41'.*Choose an output"):
        scores.open_tables(out, {})
    with pytest.raises(StorageError, match="'%41'"):
        scores.commit(out, MODEL, _rows(["/a"]), {})
    assert os.listdir(tmp_path) == []  # nothing at run%41/ nor at runA/
    # a '%' that is no escape is an ordinary character
    _commits_and_reads(str(tmp_path / "100% pure%zz"), {})


def test_a_percent_escape_behind_a_link_is_refused_too(tmp_path):
    (tmp_path / "data%2F").mkdir()
    os.symlink(tmp_path / "data%2F", tmp_path / "plain")
    with pytest.raises(StorageError, match="'%2F'"):
        scores.open_tables(str(tmp_path / "plain" / "out"), {})


def test_a_percent_escape_in_an_s3_prefix_is_refused(s3, bucket):
    import boto3
    opts = {"endpoint_url": s3}
    with pytest.raises(StorageError, match="'%41'"):
        scores.open_tables(f"s3://{bucket}/pct/run%41", opts)
    assert "Contents" not in boto3.client("s3", endpoint_url=s3).list_objects_v2(Bucket=bucket, Prefix="pct/")
