"""The score table read with DuckDB offline (no `INSTALL delta`): deltalake gives the live version's
files as an Arrow dataset, DuckDB queries it by its Python name. The README's recipe."""
import datetime as dt

import pyarrow as pa

from patchcore_dist.artifacts import scores


def _rows(images, score, run, at, model="m0"):
    n = len(images)
    return pa.table({"image": images, "score": pa.array([score] * n, pa.float64()), "model": [model] * n,
                     "digest": [f"d-{i}-{run}" for i in images], "size": pa.array([1] * n, pa.int64()),
                     "mtime": [1.0] * n, "ctime": pa.array([1.0] * n, pa.float64()),
                     "etag": pa.array([None] * n, pa.string()), "scored_at": pa.array([at] * n, pa.timestamp("s", tz="UTC")),
                     "run": [run] * n, "unchanged": [False] * n})


def test_duckdb_reads_the_live_rows_of_the_score_table(tmp_path):
    import duckdb
    from deltalake import DeltaTable
    out = str(tmp_path / "out")
    t0 = dt.datetime(2026, 12, 1, 8, tzinfo=dt.timezone.utc)
    scores.open_tables(out, {})
    scores.commit(out, "m0", _rows(["/a", "/b", "/c"], 1.0, "r1", t0), {})
    scores.commit(out, "m0", _rows(["/b"], 5.0, "r2", t0 + dt.timedelta(hours=1)), {})  # /b scored again
    scores.commit(out, "m1", _rows(["/a"], 3.0, "r3", t0, model="m1"), {})              # another model

    t = DeltaTable(f"{out}/scores").to_pyarrow_dataset()  # noqa: F841  (DuckDB finds it by its name)
    top = duckdb.sql("select image, score from t where model = 'm0' order by score desc, image").fetchall()
    assert top == [("/b", 5.0), ("/a", 1.0), ("/c", 1.0)]
    per_model = duckdb.sql("select model, count(*) from t group by model order by model").fetchall()
    assert per_model == [("m0", 3), ("m1", 1)]  # the live version: /b's first row is not counted
    assert duckdb.sql("select count(*) from t").fetchall() == [(scores.read_scores(out).num_rows,)]


def test_duckdb_reads_the_score_table_on_s3(s3, bucket):
    import duckdb
    from deltalake import DeltaTable
    out, opts = f"s3://{bucket}/duckdb-test", {"endpoint_url": s3}
    scores.open_tables(out, opts)
    scores.commit(out, "m0", _rows(["s3://x/a", "s3://x/b"], 2.0, "r1", dt.datetime(2026, 12, 1, tzinfo=dt.timezone.utc)),
                  opts)
    # the recipe's storage options for an S3-compatible endpoint (credentials from the AWS environment)
    so = {"AWS_ENDPOINT_URL": s3, "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true"}
    t = DeltaTable(f"{out}/scores", storage_options=so).to_pyarrow_dataset()  # noqa: F841
    assert duckdb.sql("select image, score from t order by image").fetchall() == [("s3://x/a", 2.0), ("s3://x/b", 2.0)]
