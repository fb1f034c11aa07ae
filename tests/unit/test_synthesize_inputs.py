"""synthesize --normal copies only what the listing accepts: a link out of the root and a name that is
not UTF-8 are skipped with their reasons (the run used to copy the link's target and abort on the
name), and two inputs whose flattened names coincide stay two images."""
from __future__ import annotations

import glob
import os

import numpy as np
from PIL import Image
from skimage import data

from patchcore_dist.synthetic.categories import synthesize_folder


def _save(path, rgb):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(rgb).save(path)


def test_refused_entries_are_skipped_and_names_stay_apart(tmp_path):
    photo = data.astronaut()[:256, :256]
    normal = tmp_path / "normal"
    for i in range(4):
        _save(str(normal / f"{i}.png"), np.roll(photo, 17 * i, axis=1))
    _save(str(normal / "a" / "b.png"), photo[::-1])
    _save(str(normal / "a__b.png"), photo[:, ::-1])
    outside = tmp_path / "secret.png"
    _save(str(outside), photo)
    os.symlink(outside, normal / "link.png")
    with open(os.path.join(os.fsencode(normal), b"bad\xff.png"), "wb") as f:
        f.write((normal / "0.png").read_bytes())
    counts = synthesize_folder(str(normal), str(tmp_path / "out"), test_fraction=0.3, seed=0)
    assert counts["skipped"] == 2  # the link out of the root and the non-UTF-8 name
    written = glob.glob(str(tmp_path / "out" / "**" / "*.png"), recursive=True)
    made = [p for p in written if "ground_truth" not in p]
    assert counts["train"] + counts["test_good"] + sum(v for k, v in counts.items()
                                                       if k not in ("train", "test_good", "skipped")) == len(made)
    assert counts["train"] + counts["test_good"] == 6  # 4 + a/b.png + a__b.png, none overwritten
