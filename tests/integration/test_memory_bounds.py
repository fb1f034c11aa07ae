"""Memory per image bounded whatever the image's shape, through the real score job in its own process:
a tiny file of a thin strip (16 x 200,000 pixels) once made the job resize it whole to the model's
shorter side (256 x 3.2M pixels: an 8.7 GB peak, killed on a Ray worker under a cgroup limit)."""
import os
import subprocess
import sys

import numpy as np
import skimage.data
from helpers import ROOT
from PIL import Image

from patchcore_dist.artifacts.scores import read_scores
from patchcore_dist.config import load_config
from patchcore_dist.pipeline.fit import run_fit

# Runs the command given as its arguments, then prints the largest resident set of its children, kB: a
# parent of its own, so that no other child of the test process counts.
PEAK = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
        "print('peak_kb', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")


def _model(tmp_path, overrides):
    train = tmp_path / "train"
    train.mkdir()
    brick = skimage.data.brick()
    for i in range(4):
        Image.fromarray(brick[40 * i:40 * i + 256, 40 * i:40 * i + 256]).save(train / f"{i}.png")
    run_fit(str(train), str(tmp_path / "model"), load_config(None, overrides))
    return str(tmp_path / "model")


def test_a_thin_strip_is_scored_in_bounded_memory(tmp_path):
    over = ["runtime.executor=local", "runtime.num_actors=1"]  # the default geometry: resize 256, crop 224
    model = _model(tmp_path, over)
    images = tmp_path / "images"
    images.mkdir()
    photo = skimage.data.astronaut()
    Image.fromarray(np.tile(photo[200:216], (1, 200_000 // 512 + 1, 1))[:, :200_000]).save(images / "strip.png")
    Image.fromarray(photo).save(images / "photo.png")
    assert os.path.getsize(images / "strip.png") < 200_000  # a small file
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "patchcore_dist.cli", "score", "--model", model, "--images", str(images),
           "--output", str(out)] + over
    r = subprocess.run([sys.executable, "-c", PEAK] + cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    peak_gb = int(r.stdout.rsplit("peak_kb", 1)[1]) / 2 ** 20
    assert peak_gb < 3.0, peak_gb
    rows = {os.path.basename(row["image"]): row for row in read_scores(str(out)).to_pylist()}
    strip, ordinary = rows["strip.png"], rows["photo.png"]
    assert strip["error"] is None and np.isfinite(strip["score"]) and (strip["height"], strip["width"]) == (16, 200_000)
    assert strip["heatmap"] and Image.open(strip["heatmap"]).size == (200_000, 16)  # at the original's size
    assert strip["warning"] == "overlay not written: JPEG takes at most 65535 pixels a side, the overlay is 16x200000"
    assert ordinary["error"] is None and ordinary["heatmap"] and ordinary["warning"] is None
