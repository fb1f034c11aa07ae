"""Heatmaps: an anomaly map coloured on the model's fixed scale, an overlay on the original image,
and their encodings (PNG for heatmaps, JPEG for overlays)."""
from __future__ import annotations

import functools
import io

import numpy as np


# Heatmaps and overlays of originals larger than this are rendered at the largest size of the same
# aspect ratio within it (16 MP: e.g. 4096 x 4096), which bounds a render task's memory (~30 bytes per
# rendered pixel: map, colours, overlay).
MAX_RENDER_PIXELS = 16_777_216


def render_size(height: int, width: int, max_pixels: int | None = None) -> tuple[int, int]:
    """The (height, width) a heatmap of an original of this size is rendered at: the original's, or
    scaled down to fit ``max_pixels`` (default :data:`MAX_RENDER_PIXELS`)."""
    max_pixels = max_pixels or MAX_RENDER_PIXELS
    if height * width <= max_pixels:
        return height, width
    s = (max_pixels / (height * width)) ** 0.5
    return max(1, int(height * s)), max(1, int(width * s))


@functools.lru_cache(maxsize=1)
def _jet() -> np.ndarray:
    from matplotlib import colormaps
    return (colormaps["jet"](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)


def heat_level(amap: np.ndarray, vrange: tuple[float, float]) -> np.ndarray:
    """Where each score lies on the scale [lo, hi], clipped to [0, 1]."""
    lo, hi = vrange
    return np.clip((np.asarray(amap, np.float32) - np.float32(lo)) / np.float32(hi - lo), 0, 1)


def colorize(amap: np.ndarray, vrange: tuple[float, float]) -> np.ndarray:
    """Anomaly map -> RGB uint8 with the 'jet' colour map on the fixed scale [lo, hi]."""
    return _jet()[np.rint(heat_level(amap, vrange) * 255).astype(np.int32)]


def encode(rgb: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    """An RGB uint8 array as image file bytes (Pillow's ``fmt`` writer, its options in ``kw``)."""
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt, **kw)
    return buf.getvalue()


def overlay(original: np.ndarray, heatmap_rgb: np.ndarray, amap: np.ndarray, vrange: tuple[float, float]) -> np.ndarray:
    """The heatmap blended onto the original image: a quarter opaque at the cold end, three quarters at the hot end."""
    alpha = (np.float32(0.25) + np.float32(0.5) * heat_level(amap, vrange))[..., None]
    return (original * (1 - alpha) + heatmap_rgb * alpha).astype(np.uint8)
