"""Helpers shared by the tests (fixtures live in conftest.py): the small image geometry and crops."""
from __future__ import annotations

import os

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout
SIZE = 160   # demo images, pixels
CROP = 128   # model input for the fast tests (resize = crop: the whole image)
SMALL = [f"image.resize={CROP}", f"image.crop={CROP}", "runtime.batch_size=8", "runtime.num_actors=1"]


def crops(paths, size=CROP):
    """The model's uint8 crops of image files."""
    from PIL import Image

    from patchcore_dist.core.preprocessing import resize_crop
    return np.stack([resize_crop(np.asarray(Image.open(p).convert("RGB")), size, size) for p in paths])
