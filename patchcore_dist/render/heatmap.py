"""Heatmaps: an anomaly map coloured on the model's fixed scale, an overlay on the original image,
and their encodings (PNG for heatmaps, JPEG for overlays)."""
from __future__ import annotations

import functools
import io

import numpy as np


# The heatmaps' colour map (matplotlib's name): dark blue at the cold end, through cyan, green and
# yellow, to dark red at the hot end; the decision threshold sits at its centre (green-yellow).
COLOR_MAP = "jet"

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
def color_table() -> np.ndarray:
    """The colour map as 256 RGB uint8 rows, level 0 (cold) to 255 (hot)."""
    from matplotlib import colormaps
    return (colormaps[COLOR_MAP](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)


def heat_level(amap: np.ndarray, vrange: tuple[float, float]) -> np.ndarray:
    """Where each score lies on the scale [lo, hi], clipped to [0, 1]."""
    lo, hi = vrange
    return np.clip((np.asarray(amap, np.float32) - np.float32(lo)) / np.float32(hi - lo), 0, 1)


def colorize(amap: np.ndarray, vrange: tuple[float, float]) -> np.ndarray:
    """Anomaly map -> RGB uint8 with :data:`COLOR_MAP` on the fixed scale [lo, hi]."""
    return color_table()[np.rint(heat_level(amap, vrange) * 255).astype(np.int32)]


def encode(rgb: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    """An RGB uint8 array as image file bytes (Pillow's ``fmt`` writer, its options in ``kw``)."""
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt, **kw)
    return buf.getvalue()


def overlay(original: np.ndarray, heatmap_rgb: np.ndarray, amap: np.ndarray, vrange: tuple[float, float]) -> np.ndarray:
    """The heatmap blended onto the original image: nearly transparent at the cold end (a normal image
    stays readable), 70 % opaque at the hot end."""
    alpha = (np.float32(0.1) + np.float32(0.6) * heat_level(amap, vrange))[..., None]
    return (original * (1 - alpha) + heatmap_rgb * alpha).astype(np.uint8)
