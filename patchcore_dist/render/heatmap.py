"""Heatmaps: an anomaly map coloured on the model's fixed scale, an overlay on the original image,
and their encodings (PNG for heatmaps, JPEG for overlays)."""
from __future__ import annotations

import functools
import io

import numpy as np


@functools.lru_cache(maxsize=1)
def _jet() -> np.ndarray:
    from matplotlib import colormaps
    return (colormaps["jet"](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)


def heat_level(amap: np.ndarray, vrange: tuple[float, float]) -> np.ndarray:
    """Where each score lies on the scale [lo, hi], clipped to [0, 1]."""
    lo, hi = vrange
    return np.clip((amap - lo) / (hi - lo), 0, 1)


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
    alpha = (0.25 + 0.5 * heat_level(amap, vrange))[..., None]
    return (original * (1 - alpha) + heatmap_rgb * alpha).astype(np.uint8)
