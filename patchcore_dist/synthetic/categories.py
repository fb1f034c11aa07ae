"""Validation categories in the MVTec AD layout from normal images, with injected defects.

    <output>/train/good/*.png                 normal images to fit on
    <output>/test/good/*.png                  held-out normal images
    <output>/test/<kind>/*.png                held-out images with one injected defect
    <output>/ground_truth/<kind>/<name>_mask.png
"""
from __future__ import annotations

import logging
from typing import Iterable

import numpy as np

from ..artifacts import storage
from ..artifacts.inputs import list_images
from ..core.preprocessing import decode_image
from ..errors import ImageError, JobError, StorageError
from ..render.heatmap import encode as encode_png
from .defects import DEFECT_KINDS, inject
from .photos import TEXTURES, mosaic_variants, photo_variants

log = logging.getLogger(__name__)


def make_category(normal: list[np.ndarray], output: str, kinds: Iterable[str] = DEFECT_KINDS,
                  test_fraction: float = 0.3, defects_per_kind: int | None = None, seed: int = 0,
                  foreign_sources: list[np.ndarray] | None = None, names: list[str] | None = None,
                  storage_options: dict | None = None, defect_size: tuple[float, float] | None = None) -> dict:
    """Split normal images into train/test and write an MVTec-layout category with injected defects
    (``defect_size``: (min, max) extent in pixels of each defect, drawn uniformly; else the demo's
    fractions of the image)."""
    if len(normal) < 3:
        raise ValueError(f"need at least 3 normal images to build a category, got {len(normal)}")
    kinds = list(kinds)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(normal))
    n_test = max(1, int(round(len(normal) * test_fraction)))
    test_idx, train_idx = order[:n_test], order[n_test:]
    names = names or [f"{i:04d}" for i in range(len(normal))]
    opts = storage_options or {}
    counts = {"train": 0, "test_good": 0}
    for i in train_idx:
        storage.write_bytes(storage.join(output, "train", "good", f"{names[i]}.png"), encode_png(normal[i]), **opts)
        counts["train"] += 1
    for i in test_idx:
        storage.write_bytes(storage.join(output, "test", "good", f"{names[i]}.png"), encode_png(normal[i]), **opts)
        counts["test_good"] += 1
    per_kind = defects_per_kind or max(1, len(test_idx) // max(1, len(kinds)) + 1)
    for kind in kinds:
        counts[kind] = 0
        for j in range(per_kind):
            i = test_idx[j % len(test_idx)]
            src = None
            if foreign_sources:
                src = foreign_sources[rng.integers(len(foreign_sources))]
            size = rng.uniform(*defect_size) if defect_size else None
            img, mask = inject(normal[i], kind, rng, source=src, size=size)
            if not mask.any():
                continue
            name = f"{names[i]}_{j:03d}"
            storage.write_bytes(storage.join(output, "test", kind, f"{name}.png"), encode_png(img), **opts)
            storage.write_bytes(storage.join(output, "ground_truth", kind, f"{name}_mask.png"),
                                encode_png((mask * 255).astype(np.uint8)), **opts)
            counts[kind] += 1
    log.info("synthesized category %s: %s", output, describe(counts))
    return counts


def describe(counts: dict) -> str:
    """The counts of :func:`make_category` (and :func:`synthesize_folder`'s ``skipped``) in words."""
    kinds = {k: v for k, v in counts.items() if k not in ("train", "test_good", "skipped")}
    text = (f"{counts.get('train', 0)} train/good, {counts.get('test_good', 0)} test/good, "
            f"{sum(kinds.values())} defective test images ({', '.join(f'{k} {v}' for k, v in kinds.items())}), "
            "masks in ground_truth/")
    if counts.get("skipped"):
        n = counts["skipped"]
        text += f"; {n} unusable normal image{'s' if n != 1 else ''} skipped (see the warnings above)"
    return text


def make_demo_benchmark(output: str, categories: Iterable[str] = ("brick", "gravel", "coffee"),
                        n_images: int = 24, size: int = 256, kinds: Iterable[str] = DEFECT_KINDS,
                        seed: int = 0, storage_options: dict | None = None) -> dict:
    """One MVTec-layout category per scikit-image photograph under ``output/<name>``."""
    result = {}
    others = {c: photo_variants(c, 2, size, seed + 99) for c in ("astronaut", "coffee", "rocket", "grass")}
    for k, name in enumerate(categories):
        normal = photo_variants(name, n_images, size, seed + k)
        sources = [v for c, vs in others.items() if c != name for v in vs]
        result[name] = make_category(normal, storage.join(output, name), kinds, seed=seed + k,
                                     foreign_sources=sources, storage_options=storage_options)
    return result


def make_highres_category(output: str, photo: str = "brick", n_images: int = 20, size: int = 1024,
                          defect_size: tuple[float, float] = (10, 40), kinds: Iterable[str] = DEFECT_KINDS,
                          seed: int = 0, storage_options: dict | None = None, test_fraction: float = 0.3,
                          defects_per_kind: int | None = None) -> dict:
    """A high-resolution category: ``size`` x ``size`` native-scale mosaics of a scikit-image texture
    (:func:`.photos.mosaic_variants`) with small defects of ``defect_size`` pixels and exact masks."""
    if photo not in TEXTURES:
        raise JobError(f"--photo {photo!r}: high-resolution categories are made of textures ({', '.join(TEXTURES)})")
    if n_images < 3 or size < 64 or size > 32768:
        raise JobError(f"--images {n_images} / --image-size {size}: need at least 3 images of 64 to 32768 pixels")
    normal = mosaic_variants(photo, n_images, size, seed)
    others = [v for c in ("coffee", "rocket", "astronaut") for v in photo_variants(c, 1, 256, seed + 99)]
    return make_category(normal, output, kinds, test_fraction, defects_per_kind, seed=seed, foreign_sources=others,
                         storage_options=storage_options, defect_size=defect_size)


def synthesize_folder(normal: str, output: str, kinds: Iterable[str] = DEFECT_KINDS, test_fraction: float = 0.3,
                      defects_per_kind: int | None = None, seed: int = 0, storage_options: dict | None = None,
                      max_pixels: int = 100_000_000, defect_size: tuple[float, float] | None = None) -> dict:
    """A folder of normal images (local or s3) -> an MVTec-layout category under ``output``."""
    opts = storage_options or {}
    files = list_images(normal, opts, "normal images")
    images, names, skipped = [], [], []
    for e in files:
        if e["error"]:  # refused by the listing (a link out of the root, a name that is not UTF-8): never read
            skipped.append(f"{e['rel']}: {e['error']}")
            continue
        try:
            images.append(decode_image(storage.read_bytes(e["uri"], **opts), max_pixels))
        except (ImageError, StorageError, OSError) as err:
            skipped.append(f"{e['rel']}: {err}")
            continue
        name = storage.safe_relpath(e["rel"]).replace("/", "__").rsplit(".", 1)[0]
        names.append(name if name not in names else f"{name}~{len(names)}")  # a/b.png and a__b.png stay apart
    for s in skipped:
        log.warning("skipped (not usable): %s", s)
    if len(images) < 3:
        raise JobError(f"need at least 3 usable normal images under {normal}, found {len(images)}")
    counts = make_category(images, output, kinds, test_fraction, defects_per_kind, seed,
                           names=names, storage_options=opts, defect_size=defect_size)
    counts["skipped"] = len(skipped)
    return counts
