"""Driver memory and time of score's incremental plan on a synthetic score table.

Builds (once, under benchmarks/data/score_plan/) a Delta score table of ``--rows`` rows for one
model, written as 10 commits like 10 scheduled runs, with realistic values (60-character S3 URIs,
heatmap URIs, sha256 digests, ETags), and the listing of the archive: every archived image, 1 %
changed, 1 % new. Then, each in a fresh process, measures

* ours: :func:`patchcore_dist.artifacts.scores.previous` (image, size, mtime, ctime, ETag and digest
  of the model's successful rows, read in batches and matched by binary search), and
* the baseline, the earlier plan: every previous row of the model as a Python dict, compared with
  the listing's dicts (on the table's first 2 commits, rows / 5: it is linear in the rows).

Memory is the peak resident set the plan adds to the process (its high-water mark, reset right
before the plan, minus the resident set then), divided by the archived images; the listing itself
is an input (its Arrow size is printed beside).

    python benchmarks/score_plan.py                      # 1M rows (--rows); baseline on 200k
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import DATA  # noqa: E402

MODEL = "5f3c2a9e81d04b7a"


def _uris(idx: np.ndarray) -> list[str]:
    return [f"s3://factory-archive/line-{i % 4}/2026/11/{i % 28 + 1:02d}/cam-{i % 8:02d}/{i:09d}.png" for i in idx]


def build(root: str, rows: int) -> None:
    """The score table (10 commits of rows / 10) and the listing (Arrow, sorted by uri) under ``root``."""
    from deltalake import write_deltalake
    from patchcore_dist.artifacts import scores
    shutil.rmtree(root, ignore_errors=True)
    table_uri = scores.scores_uri(os.path.join(root, "out"))
    rng = np.random.default_rng(0)
    at = dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)
    for c in range(10):
        idx = np.arange(c * rows // 10, (c + 1) * rows // 10)
        n, uris = len(idx), _uris(idx)
        t = pa.table({"image": uris, "score": rng.random(n), "is_anomaly": rng.random(n) > 0.99,
                      "heatmap": [u.replace("factory-archive/", "factory-scores/heatmaps/" + MODEL + "/") + ".png"
                                  for u in uris],
                      "height": pa.array(np.full(n, 1024), pa.int32()), "width": pa.array(np.full(n, 1280), pa.int32()),
                      "model": [MODEL] * n, "digest": [f"{i * 2654435761:064x}" for i in idx],
                      "size": idx * 3 + 200_000, "mtime": idx + 1.7e9, "etag": [f'"{i * 40503:032x}"' for i in idx],
                      "decode_ms": pa.array(rng.random(n) * 30, pa.float32()),
                      "score_ms": pa.array(rng.random(n) * 10, pa.float32()),
                      "scored_at": pa.array([at + dt.timedelta(days=c)] * n, pa.timestamp("s", tz="UTC")),
                      "run": [f"2026110{c}T020000-abcdef"] * n})
        write_deltalake(table_uri, scores._conform(t, scores._stored(scores.SCORE_SCHEMA)), mode="append",
                        partition_by=["model"])
    idx = np.concatenate([np.arange(rows), np.arange(10 ** 10, 10 ** 10 + rows // 100)])  # 1 % new images
    etags = [f'"{i * 40503:032x}"' if i % 100 else f'"{i:032x}"' for i in idx]          # 1 % changed
    listing = pa.table({"uri": _uris(idx), "rel": [u[len("s3://factory-archive/"):] for u in _uris(idx)],
                        "size": idx * 3 + 200_000, "mtime": idx + 1.7e9, "ctime": pa.nulls(len(idx), pa.float64()),
                        "etag": etags}).sort_by("uri")
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    pq.write_table(listing, os.path.join(root, "listing.parquet"), row_group_size=len(idx))
    # the baseline's archive: the images of the table's first 2 commits (version 1), i.e. rows / 5
    first = pa.array(_uris(np.arange(rows // 5)))
    pq.write_table(listing.filter(pc.is_in(listing.column("uri"), value_set=first)),
                   os.path.join(root, "listing-baseline.parquet"), row_group_size=len(idx))


def _hwm_reset() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def measure(root: str, which: str) -> dict:
    """One plan in this (fresh) process: seconds and the peak resident memory it adds."""
    import pyarrow.parquet as pq
    from patchcore_dist.artifacts import delta, scores
    out = os.path.join(root, "out")
    # one chunk, as score lists it; the baseline's listing as the dicts it took
    listing = pq.read_table(os.path.join(root, "listing.parquet" if which == "ours" else "listing-baseline.parquet"))
    entries = listing.to_pylist() if which == "baseline" else None
    import gc
    gc.collect()
    reset = _hwm_reset()
    base = _status("VmRSS")
    t0 = time.perf_counter()
    if which == "ours":
        unchanged, known = scores.previous(out, MODEL, listing, {})
        skipped = int(unchanged.sum())
    else:
        # every column of every row (here: the first 2 commits), as the earlier plan read its parts
        table = scores._conform(delta.load(scores.scores_uri(out), {}, version=1).to_pyarrow_table(), scores.SCORE_SCHEMA)
        previous = {r["image"]: r for r in table.to_pylist() if r["error"] is None}
        todo = [e for e in entries if not (e["uri"] in previous and previous[e["uri"]]["size"] == e["size"]
                                           and previous[e["uri"]]["mtime"] == e["mtime"])]
        skipped = len(entries) - len(todo)
    seconds = time.perf_counter() - t0
    peak = _status("VmHWM")
    return {"which": which, "images": listing.num_rows, "skipped": skipped, "seconds": round(seconds, 2),
            "peak_added_mb": round((peak - base) / 1e6, 1), "bytes_per_image": round((peak - base) / listing.num_rows),
            "listing_arrow_bytes_per_image": round(listing.nbytes / listing.num_rows), "hwm_reset": reset}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--root", default=os.path.join(DATA, "score_plan"))
    p.add_argument("--measure", choices=["ours", "baseline"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.measure:
        print(json.dumps(measure(a.root, a.measure)))
        return
    stamp = os.path.join(a.root, f"rows-{a.rows}")
    if not os.path.exists(stamp):
        t0 = time.time()
        build(a.root, a.rows)
        open(stamp, "w").close()
        print(f"built a {a.rows:,}-row score table in {time.time() - t0:.0f} s")
    results = []
    for which in ("ours", "baseline"):
        r = subprocess.run([sys.executable, __file__, "--measure", which, "--root", a.root],
                           capture_output=True, text=True, check=True)
        results.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]))
    ours, base = results
    print(f"ours: {ours['images']:,} images, {ours['seconds']} s, {ours['bytes_per_image']} bytes per image "
          f"(+{ours['peak_added_mb']} MB); baseline (earlier plan, {base['images']:,} images): {base['seconds']} s, "
          f"{base['bytes_per_image']} bytes per image: x{base['bytes_per_image'] / max(1, ours['bytes_per_image']):.1f} "
          "less memory per image")


if __name__ == "__main__":
    main()
