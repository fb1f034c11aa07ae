"""Listing and planning at scale (issue 29): a folder of N empty image files in F subfolders, and a
Parquet manifest of the same URIs, each planned by `patchcore score --dry-run` as a fresh process
under /usr/bin/time -v (peak RSS, wall time).

    python benchmarks/listing_scale.py --files 1000000 --folders 1000 [--keep DIR]

The files are empty (created with os.open / os.close: about 1 GB of inodes, no data), in a temporary
folder on this disk that is deleted afterwards unless --keep names one. A small model is fitted
once (the demo's synthetic textures at the test's small geometry) so the dry runs have a model.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_tree(base: str, files: int, folders: int) -> str:
    """``files`` empty .png files spread over ``folders`` subfolders of ``base``/images."""
    images = os.path.join(base, "images")
    per = -(-files // folders)
    t = time.time()
    made = 0
    for f in range(folders):
        d = os.path.join(images, f"f{f:04d}")
        os.makedirs(d, exist_ok=True)
        for i in range(min(per, files - made)):
            os.close(os.open(os.path.join(d, f"img{i:05d}.png"), os.O_CREAT | os.O_WRONLY, 0o644))
        made += min(per, files - made)
        if made >= files:
            break
    print(f"made {made} files in {folders} folders under {images} in {time.time() - t:.1f} s", flush=True)
    return images


def make_manifest(images: str, path: str) -> None:
    """A Parquet manifest (``image`` column) of every file under ``images``, written from Arrow batches."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    schema = pa.schema([("image", pa.string())])
    with pq.ParquetWriter(path, schema) as w:
        for d in sorted(os.listdir(images)):
            folder = os.path.join(images, d)
            w.write_table(pa.table({"image": [os.path.join(folder, n) for n in sorted(os.listdir(folder))]},
                                   schema=schema))


def timed(cmd: list[str], env: dict) -> dict:
    """Run ``cmd`` under /usr/bin/time -v: exit code, wall seconds, peak RSS (MB), the output's tail."""
    p = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env, cwd=ROOT)
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", p.stderr).group(1)
    secs = sum(float(x) * 60 ** i for i, x in enumerate(reversed(wall.split(":"))))
    return {"rc": p.returncode, "seconds": secs, "peak_mb": rss / 1024,
            "out": (p.stdout + "\n".join(line for line in p.stderr.splitlines() if "\t" not in line))[-1500:]}


def fit_model(base: str, env: dict) -> str:
    """A small model on synthetic textures (what the test suite fits), once."""
    model = os.path.join(base, "model")
    code = ("import sys; sys.path.insert(0, 'tests'); from helpers import SMALL; "
            "from patchcore_dist.config import load_config; from patchcore_dist.pipeline.fit import run_fit; "
            "import os; from PIL import Image; from patchcore_dist.synthetic.photos import photo_variants; "
            f"train = {os.path.join(base, 'train')!r}; os.makedirs(train, exist_ok=True); "
            "[Image.fromarray(im).save(f'{train}/{i:02d}.png') for i, im in enumerate(photo_variants('brick', 12, 160))]; "
            f"run_fit({os.path.join(base, 'train')!r}, {model!r}, load_config(None, SMALL + ['runtime.executor=local']))")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT)
    return model


def write_table(images: str, model: str, out: str) -> None:
    """A score table under ``out`` with a successful row for every file under ``images`` (the listing's
    statistics), as a scheduled run finds it: the dry run then plans every image as unchanged."""
    import datetime as dt

    import pyarrow as pa
    from deltalake import write_deltalake

    from patchcore_dist.artifacts.inputs import listing_table
    from patchcore_dist.artifacts.model import load_model
    from patchcore_dist.artifacts.scores import SCORE_SCHEMA, _conform, _stored, open_tables, scores_uri
    digest = load_model(model, {}).digest
    listing = listing_table(images, {}, "images")
    n = listing.num_rows
    rows = pa.table({"image": listing.column("uri"), "score": pa.array([1.0] * n), "model": [digest] * n,
                     "digest": ["0" * 64] * n, "size": listing.column("size"), "mtime": listing.column("mtime"),
                     "ctime": listing.column("ctime"), "etag": listing.column("etag"),
                     "scored_at": pa.array([dt.datetime(2026, 12, 1, tzinfo=dt.timezone.utc)] * n,
                                           pa.timestamp("s", tz="UTC")), "run": ["bench"] * n})
    open_tables(out, {})
    write_deltalake(scores_uri(out), _conform(rows, _stored(SCORE_SCHEMA)), mode="append", partition_by=["model"])
    print(f"wrote a score table of {n} rows under {out}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=1_000_000)
    ap.add_argument("--folders", type=int, default=1000)
    ap.add_argument("--keep", help="build (or reuse) the tree in this folder and keep it")
    ap.add_argument("--model", help="an existing model (else one is fitted)")
    ap.add_argument("--with-table", action="store_true",
                    help="also a dry run over the folder into an output whose table has a row for every file")
    a = ap.parse_args()
    base = a.keep or tempfile.mkdtemp(prefix="listing-scale-", dir=os.path.join(ROOT, "benchmarks"))
    env = dict(os.environ, PYTHONPATH=ROOT)
    try:
        images = os.path.join(base, "images")
        if not os.path.isdir(images):
            make_tree(base, a.files, a.folders)
        manifest = os.path.join(base, "manifest.parquet")
        if not os.path.exists(manifest):
            make_manifest(images, manifest)
        model = a.model or (os.path.join(base, "model") if os.path.exists(os.path.join(base, "model", "manifest.json"))
                            else fit_model(base, env))
        runs = [("folder", images, os.path.join(base, "out-folder")),
                ("manifest", manifest, os.path.join(base, "out-manifest"))]
        if a.with_table:
            table_out = os.path.join(base, "out-table")
            if not os.path.exists(table_out):
                sys.path.insert(0, ROOT)
                write_table(images, model, table_out)
            runs.append(("folder, every image in the table", images, table_out))
        for what, src, out in runs:
            r = timed([sys.executable, "-m", "patchcore_dist.cli", "score", "--dry-run", "--model", model,
                       "--images", src, "--output", out], env)
            print(f"dry run over the {what}: exit {r['rc']}, {r['seconds']:.1f} s, peak RSS {r['peak_mb']:.0f} MB, "
                  f"output folder exists afterwards: {os.path.exists(out)}\n{r['out']}", flush=True)
    finally:
        if not a.keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
