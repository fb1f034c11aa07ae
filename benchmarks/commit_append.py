"""First-time rows appended vs merged (issue 29, part 4): one commit of N new images into a score
table whose model partition already holds M rows, through `scores.commit` with the plan's
``first_time`` flags (an append) and without them (the MERGE of before), each on a fresh copy.

    python benchmarks/commit_append.py --table-rows 1000000 --new 50000
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import sys
import tempfile
import time

import pyarrow as pa

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from patchcore_dist.artifacts import scores  # noqa: E402

MODEL = "0123456789abcdef"


def rows(start: int, n: int, first_time: bool | None) -> pa.Table:
    at = dt.datetime(2026, 12, 1, tzinfo=dt.timezone.utc)
    t = pa.table({"image": [f"s3://bucket/archive/line-{i % 97:02d}/image-{i:09d}.png" for i in range(start, start + n)],
                  "score": pa.array([1.0] * n), "model": [MODEL] * n, "digest": ["0" * 64] * n,
                  "size": pa.array([1000] * n, pa.int64()), "mtime": pa.array([1.0] * n),
                  "etag": ['"0123456789abcdef0123456789abcdef"'] * n,
                  "scored_at": pa.array([at] * n, pa.timestamp("s", tz="UTC")), "run": ["bench"] * n,
                  "unchanged": [False] * n})
    return t if first_time is None else t.append_column("first_time", pa.array([first_time] * n))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--table-rows", type=int, default=1_000_000)
    ap.add_argument("--new", type=int, default=50_000)
    a = ap.parse_args()
    base = tempfile.mkdtemp(prefix="commit-append-")
    try:
        seed = os.path.join(base, "seed")
        scores.open_tables(seed, {})
        scores.commit(seed, MODEL, rows(0, a.table_rows, True), {}, since=0, run="seed")
        version = scores.previous_rows(seed, MODEL, pa.table({"uri": ["s3://x"], "size": [1], "mtime": [1.0],
                                                              "ctime": [None], "etag": ["e"]}), {}).version
        new = rows(a.table_rows, a.new, True)
        for how, table in (("append (first_time)", new), ("MERGE (before)", new.drop_columns(["first_time"]))):
            out = os.path.join(base, how.split()[0])
            shutil.copytree(seed, out)
            t = time.perf_counter()
            m = scores.commit(out, MODEL, table, {}, since=version, run="bench")
            secs = time.perf_counter() - t
            print(f"{how}: {a.new} new rows into a partition of {a.table_rows}: {secs:.2f} s "
                  f"(appended {m['appended']}, merged {m.get('num_target_rows_inserted', 0)})", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
