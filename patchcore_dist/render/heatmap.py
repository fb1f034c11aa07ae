"""Heatmaps: an anomaly map coloured on the model's fixed scale, an overlay on the original image,
and their encodings (PNG for heatmaps, JPEG for overlays)."""
from __future__ import annotations

import functools
import io

import numpy as np


# The heatmaps' colour map (matplotlib's name): dark blue at the cold end, through cyan, green and
# yellow, to dark red at the hot end; the decision threshold sits at its centre (green-yellow).
COLOR_MAP = "jet"


@functools.lru_cache(maxsize=1)
def color_table() -> np.ndarray:
    """The colour map as 256 RGB uint8 rows, level 0 (cold) to 255 (hot)."""
    from matplotlib import colormaps
    return (colormaps[COLOR_MAP](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)


def heat_level(amap: np.ndarray, vrange: tuple[float, float]) -> np.ndarray:
    """Where each score lies on the scale [lo, hi], clipped to [0, 1]."""
    lo, hi = vrange
    return np.clip((amap - lo) / (hi - lo), 0, 1)


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
    alpha = (0.1 + 0.6 * heat_level(amap, vrange))[..., None]
    return (original * (1 - alpha) + heatmap_rgb * alpha).astype(np.uint8)
