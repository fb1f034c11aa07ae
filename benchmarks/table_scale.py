"""A score table of millions of rows (issue 29, part 4 and 6): what one scheduled run's commit costs.

Builds a synthetic score table whose model partition holds ``--table-rows`` rows (written in
batches, then compacted as ``patchcore maintain`` leaves it), then, each in a fresh subprocess so
that its peak memory is its own, on a copy of that table:

- ``commit``: one run that adds ``--new`` first-time images and re-scores ``--rescored`` known
  ones, through ``scores.commit`` exactly as the score job calls it (the plan's ``first_time``
  flags): time, the process's peak RSS, data files removed and added, rows copied by the MERGE;
- ``optimize``: the compaction of the partition after such runs (``scores.compact_if_due``'s OPTIMIZE).

    python benchmarks/table_scale.py --table-rows 10000000 --new 10000 --rescored 1000

Other deltalake versions run the same code with the version put first on the path, e.g.
``pip install --target /tmp/dl150 deltalake==1.5.0`` and ``--deltalake-path /tmp/dl150``.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import peak_rss_mb  # noqa: E402  (benchmarks/, the script's folder, is on the path)
from patchcore_dist.artifacts import delta, scores  # noqa: E402

MODEL = "0123456789abcdef"
BATCH = 1_000_000


def rows(ids: np.ndarray, run: str, first_time: bool | None, day: int = 1) -> pa.Table:
    """Score rows shaped as the job writes them, for images ``ids`` of a 97-line archive."""
    n = len(ids)
    at = dt.datetime(2026, 12, day, tzinfo=dt.timezone.utc)
    image = pa.array([f"s3://bucket/archive/line-{i % 97:02d}/image-{i:09d}.png" for i in ids.tolist()])
    rng = np.random.default_rng(int(ids[0]) if n else 0)
    t = pa.table({
        "image": image, "score": pa.array(rng.uniform(1, 5, n)), "normalized_score": pa.array(rng.uniform(0, 1, n)),
        "is_anomaly": pa.array(rng.uniform(0, 1, n) > 0.99),
        "heatmap": pa.array([None] * n, pa.string()),
        "height": pa.array(np.full(n, 224, np.int32)), "width": pa.array(np.full(n, 224, np.int32)),
        "model": pa.array([MODEL] * n), "error": pa.array([None] * n, pa.string()),
        "warning": pa.array([None] * n, pa.string()),
        "digest": pa.array([f"{i:064x}" for i in ids.tolist()]),
        "size": pa.array(np.full(n, 150_000, np.int64)), "mtime": pa.array(np.full(n, 1.7e9 + day)),
        "ctime": pa.array([None] * n, pa.float64()),
        "etag": pa.array([f'"{i:032x}"' for i in ids.tolist()]),
        "decode_ms": pa.array(np.full(n, 3.0, np.float32)), "score_ms": pa.array(np.full(n, 9.0, np.float32)),
        "scored_at": pa.array([at] * n, pa.timestamp("s", tz="UTC")), "run": pa.array([run] * n),
        "unchanged": pa.array(np.zeros(n, bool)),
    })
    return t if first_time is None else t.append_column("first_time", pa.array(np.full(n, first_time)))


def build(out: str, n: int) -> int:
    """A score table whose model partition holds images 0..n-1, compacted; returns its version."""
    scores.open_tables(out, {})
    for start in range(0, n, BATCH):
        ids = np.arange(start, min(n, start + BATCH))
        scores.commit(out, MODEL, rows(ids, f"seed-{start}", True), {}, since=delta.load(scores.scores_uri(out), {}).version(),
                      run=f"seed-{start}")
        print(f"  built {ids[-1] + 1:,} rows", file=sys.stderr, flush=True)
    uri = scores.scores_uri(out)
    delta.compact(delta.load(uri, {}), uri)
    return delta.load(uri, {}).version()


def files(out: str) -> tuple[int, int]:
    dt_ = delta.load(scores.scores_uri(out), {})
    paths = dt_.file_uris()
    return len(paths), sum(os.path.getsize(p) for p in paths)


def child(op: str, out: str, table_rows: int, new: int, rescored: int) -> dict:
    before = files(out)
    t = time.perf_counter()
    if op == "commit":
        rng = np.random.default_rng(0)
        again = np.sort(rng.choice(table_rows, rescored, replace=False))
        parts = [rows(np.arange(table_rows, table_rows + new), "bench", True, day=2)]
        batch = pa.concat_tables(parts + ([rows(again, "bench", False, day=2)] if rescored else []))
        version = delta.load(scores.scores_uri(out), {}).version()
        m = scores.commit(out, MODEL, batch, {}, since=version, run="bench")
    else:
        uri = scores.scores_uri(out)
        m = delta.compact(delta.load(uri, {}), uri, [("model", "=", MODEL)]) or {}
    secs = time.perf_counter() - t
    after = files(out)
    import deltalake
    keep = ("appended", "num_target_files_added", "num_target_files_removed", "num_target_rows_copied",
            "num_target_rows_updated", "num_target_rows_inserted", "numFilesRemoved", "numFilesAdded")
    return {"op": op, "deltalake": deltalake.__version__, "seconds": round(secs, 2),
            "peak_rss_mb": round(peak_rss_mb()),
            "files_before": before[0], "mb_before": round(before[1] / 2**20), "files_after": after[0],
            **{k: m[k] for k in keep if k in m}}


def run_child(op: str, out: str, a, path: str | None) -> dict:
    env = dict(os.environ)
    if path:
        env["PYTHONPATH"] = path + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", op, "--dir", out, "--table-rows", str(a.table_rows),
           "--new", str(a.new), "--rescored", str(a.rescored)]
    return json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table-rows", type=int, default=10_000_000)
    ap.add_argument("--new", type=int, default=10_000)
    ap.add_argument("--rescored", type=int, default=1_000)
    ap.add_argument("--deltalake-path", action="append", default=[],
                    help="a folder holding another deltalake version (pip install --target); repeatable")
    ap.add_argument("--child", choices=["commit", "optimize"], help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.dir, a.table_rows, a.new, a.rescored)))
        return
    base = tempfile.mkdtemp(prefix="table-scale-")
    try:
        seed = os.path.join(base, "seed")
        t = time.perf_counter()
        build(seed, a.table_rows)
        n, size = files(seed)
        print(f"table: {a.table_rows:,} rows in {n} data files, {size / 2**20:.0f} MB, built in "
              f"{time.perf_counter() - t:.0f} s", flush=True)
        for path in [None] + a.deltalake_path:
            out = os.path.join(base, "run")
            shutil.rmtree(out, ignore_errors=True)
            shutil.copytree(seed, out)
            for op in ("commit", "optimize"):
                print(json.dumps(run_child(op, out, a, path)), flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
