"""Listing and planning at scale (issue 29): a folder of N empty image files in F subfolders, and a
Parquet manifest of the same URIs, each planned by `patchcore score --dry-run` as a fresh process
under /usr/bin/time -v (peak RSS, wall time). Also times the listing alone (`--listing-only`).

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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=1_000_000)
    ap.add_argument("--folders", type=int, default=1000)
    ap.add_argument("--keep", help="build (or reuse) the tree in this folder and keep it")
    ap.add_argument("--model", help="an existing model (else one is fitted)")
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
        for what, src in (("folder", images), ("manifest", manifest)):
            out = os.path.join(base, f"out-{what}")
            r = timed([sys.executable, "-m", "patchcore_dist.cli", "score", "--dry-run", "--model", model,
                       "--images", src, "--output", out], env)
            print(f"dry run over the {what}: exit {r['rc']}, {r['seconds']:.1f} s, peak RSS {r['peak_mb']:.0f} MB, "
                  f"output folder created: {os.path.exists(out)}\n{r['out']}", flush=True)
    finally:
        if not a.keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
