"""Synthetic defects with exact masks, for users (and tests) without defect samples.

Each defect kind takes an HxWx3 uint8 image and a numpy Generator and returns the defective image
and a boolean mask of the changed pixels. Kinds: scratch, stain, foreign (material pasted from
another image), hole, deformation (a local swirl of the surface).
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

DEFECT_KINDS = ("scratch", "stain", "foreign", "hole", "deformation")


def _blob_mask(h: int, w: int, rng: np.random.Generator, frac: float, size: float | None = None) -> np.ndarray:
    """An irregular blob covering about ``frac`` of the image (or about ``size`` pixels across), away
    from the borders."""
    area = frac * h * w if size is None else np.pi * (size / 2) ** 2
    r = np.sqrt(area / np.pi)
    cy = rng.uniform(0.25, 0.75) * h
    cx = rng.uniform(0.25, 0.75) * w
    angles = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    radii = r * (1 + 0.3 * np.sin(angles * rng.integers(2, 5) + rng.uniform(0, 6.28))) * rng.uniform(0.85, 1.15, 24)
    pts = [(cx + rr * np.cos(a) * rng.uniform(0.7, 1.3), cy + rr * np.sin(a)) for rr, a in zip(radii, angles)]
    img = Image.new("L", (w, h), 0)
    ImageDraw.Draw(img).polygon(pts, fill=255)
    return np.asarray(img) > 127


def scratch(image: np.ndarray, rng: np.random.Generator, size: float | None = None, **_) -> tuple[np.ndarray, np.ndarray]:
    h, w = image.shape[:2]
    n = rng.integers(3, 6)
    x, y = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h
    angle = rng.uniform(0, np.pi)
    length = rng.uniform(0.25, 0.45) * min(h, w) if size is None else size
    pts = [(x, y)]
    for _ in range(n):
        angle += rng.normal(0, 0.25)
        x += np.cos(angle) * length / n
        y += np.sin(angle) * length / n
        pts.append((x, y))
    width = max(2, int(round((min(h, w) if size is None else 8 * size) * rng.uniform(0.012, 0.02))))
    m = Image.new("L", (w, h), 0)
    ImageDraw.Draw(m).line(pts, fill=255, width=width, joint="curve")
    mask = np.asarray(m) > 127
    out = image.copy()
    bright = rng.random() < 0.5
    color = np.array([235, 235, 230] if bright else [20, 18, 15], dtype=np.float32)
    out[mask] = (0.15 * out[mask] + 0.85 * color).astype(np.uint8)
    return out, mask


def stain(image: np.ndarray, rng: np.random.Generator, size: float | None = None, **_) -> tuple[np.ndarray, np.ndarray]:
    h, w = image.shape[:2]
    mask = _blob_mask(h, w, rng, rng.uniform(0.01, 0.03), size)
    tint = np.array(rng.choice([[140, 60, 20], [60, 40, 20], [30, 90, 30], [160, 30, 120]]), dtype=np.float32)
    soft = ndimage.gaussian_filter(mask.astype(np.float32), 1.5)[..., None] * 0.8
    out = (image.astype(np.float32) * (1 - soft) + tint * soft).clip(0, 255).astype(np.uint8)
    return out, soft[..., 0] > 0.2


def foreign(image: np.ndarray, rng: np.random.Generator, source: np.ndarray | None = None,
            size: float | None = None, **_) -> tuple[np.ndarray, np.ndarray]:
    """Material from ``source`` (another image) pasted into a blob; a colour-inverted copy if none."""
    h, w = image.shape[:2]
    mask = _blob_mask(h, w, rng, rng.uniform(0.01, 0.03), size)
    if source is None:
        src = 255 - image[::-1, ::-1]
    else:
        src = np.asarray(Image.fromarray(source).convert("RGB").resize((w, h), Image.BILINEAR))
    out = image.copy()
    out[mask] = src[mask]
    return out, mask


def hole(image: np.ndarray, rng: np.random.Generator, size: float | None = None, **_) -> tuple[np.ndarray, np.ndarray]:
    h, w = image.shape[:2]
    mask = _blob_mask(h, w, rng, rng.uniform(0.006, 0.015), size)
    dist = ndimage.distance_transform_edt(mask)
    depth = np.clip(dist / max(dist.max(), 1.0), 0, 1)[..., None]
    out = image.astype(np.float32)
    out = np.where(mask[..., None], out * 0.25 * (1 - depth) + 8.0, out)
    rim = ndimage.binary_dilation(mask, iterations=2) & ~mask
    out[rim] = np.minimum(out[rim] * 1.5 + 40, 255)
    return out.clip(0, 255).astype(np.uint8), mask | rim


def deformation(image: np.ndarray, rng: np.random.Generator, size: float | None = None,
                **_) -> tuple[np.ndarray, np.ndarray]:
    """Swirl a disc of the surface; the mask is where pixels moved by more than one pixel."""
    h, w = image.shape[:2]
    r = min(h, w) * rng.uniform(0.09, 0.14) if size is None else size / 2
    cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    dy, dx = yy - cy, xx - cx
    rho = np.hypot(dy, dx)
    strength = rng.choice([-1, 1]) * rng.uniform(2.0, 3.5)
    theta = strength * np.clip(1 - rho / r, 0, 1) ** 2
    sy = cy + dx * np.sin(theta) + dy * np.cos(theta)
    sx = cx + dx * np.cos(theta) - dy * np.sin(theta)
    out = np.stack([ndimage.map_coordinates(image[..., c].astype(np.float32), [sy, sx], order=1, mode="reflect")
                    for c in range(3)], -1)
    mask = np.hypot(sy - yy, sx - xx) > 1.0
    return out.clip(0, 255).astype(np.uint8), mask


KINDS = {"scratch": scratch, "stain": stain, "foreign": foreign, "hole": hole, "deformation": deformation}


def inject(image: np.ndarray, kind: str, rng: np.random.Generator, source: np.ndarray | None = None,
           size: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One defect of ``kind``; ``size``: its extent in pixels (a blob's diameter, a scratch's length),
    else a fraction of the image as the demo uses."""
    if kind not in KINDS:
        raise ValueError(f"unknown defect kind {kind!r}; one of {', '.join(DEFECT_KINDS)}")
    out, mask = KINDS[kind](np.ascontiguousarray(image[..., :3]), rng, source=source, size=size)
    return out, mask.astype(bool)
