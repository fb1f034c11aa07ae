"""The demo's normal images: variations of real photographs shipped with scikit-image (random crops
of textures; small shifts and lighting changes of objects)."""
from __future__ import annotations

import numpy as np
from PIL import Image

TEXTURES = ("brick", "gravel", "grass")
OBJECTS = ("coffee", "chelsea", "astronaut", "rocket", "coins", "camera")


def _photo(name: str) -> np.ndarray:
    import skimage.data
    img = getattr(skimage.data, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, -1)
    return np.ascontiguousarray(img[..., :3]).astype(np.uint8)


def photo_variants(name: str, n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` normal variations (size x size RGB) of one scikit-image photograph."""
    rng = np.random.default_rng(seed)
    img = _photo(name)
    h, w = img.shape[:2]
    out = []
    for _ in range(n):
        if name in TEXTURES:
            side = int(min(h, w) * rng.uniform(0.45, 0.55))
        else:
            side = int(min(h, w) * rng.uniform(0.9, 0.97))
        y = rng.integers(0, h - side + 1)
        x = rng.integers(0, w - side + 1)
        crop = Image.fromarray(img[y:y + side, x:x + side]).resize((size, size), Image.BILINEAR)
        arr = np.asarray(crop).astype(np.float32)
        if name in TEXTURES and rng.random() < 0.5:
            arr = arr[:, ::-1]
        arr = arr * rng.uniform(0.93, 1.07) + rng.uniform(-6, 6)
        out.append(np.clip(arr, 0, 255).astype(np.uint8))
    return out


def mosaic_variants(name: str, n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` normal ``size`` x ``size`` RGB images of a scikit-image texture at its native scale (no
    resampling): random windows of the photograph mirrored into a seamless mosaic as large as needed
    (high-resolution inspection), with flips and small lighting changes."""
    rng = np.random.default_rng(seed)
    img = _photo(name)
    h, w = img.shape[:2]
    canvas = np.pad(img, ((0, size + h), (0, size + w), (0, 0)), mode="symmetric")
    out = []
    for _ in range(n):
        y, x = rng.integers(0, h), rng.integers(0, w)
        arr = canvas[y:y + size, x:x + size].astype(np.float32)
        if rng.random() < 0.5:
            arr = arr[:, ::-1]
        arr = arr * rng.uniform(0.95, 1.05) + rng.uniform(-4, 4)
        out.append(np.ascontiguousarray(np.clip(arr, 0, 255).astype(np.uint8)))
    return out
