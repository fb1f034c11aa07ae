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


# Heatmap PNGs: zlib level 1 and no optimize pass: files ~35 % larger than at Pillow's default level 6,
# written in a third of the time (still lossless; benchmarks/score_job.py).
PNG_OPTIONS = {"compress_level": 1, "optimize": False}


def heat_level(amap: np.ndarray, vrange: tuple[float, float]) -> np.ndarray:
    """Where each score lies on the scale [lo, hi], clipped to [0, 1]."""
    lo, hi = vrange
    return np.clip((np.asarray(amap, np.float32) - np.float32(lo)) / np.float32(hi - lo), 0, 1)


def heat_index(amap: np.ndarray, vrange: tuple[float, float]) -> np.ndarray:
    """The colour level (0..255, uint8) of each score on the scale [lo, hi]: the level
    :func:`colorize` and :func:`overlay` look their colours and opacities up by. Computed in place on
    one float32 copy (the map can be 16 MP)."""
    lo, hi = vrange
    x = np.subtract(np.asarray(amap, np.float32), np.float32(lo), dtype=np.float32)
    x *= np.float32(255.0 / (hi - lo))
    np.clip(x, 0, 255, out=x)
    np.rint(x, out=x)
    return x.astype(np.uint8)


@functools.lru_cache(maxsize=1)
def _alpha_table() -> np.ndarray:
    """The overlay's opacity per colour level in 1/256 units (uint16): 0.1 at the cold end, 0.7 hot."""
    return np.rint(256 * (0.1 + 0.6 * np.arange(256) / 255.0)).astype(np.uint16)


def colorize(amap: np.ndarray, vrange: tuple[float, float], level: np.ndarray | None = None) -> np.ndarray:
    """Anomaly map -> RGB uint8 with :data:`COLOR_MAP` on the fixed scale [lo, hi] (a table look-up of
    :func:`heat_index`; ``level`` when the caller already has it)."""
    level = heat_index(amap, vrange) if level is None else level
    return np.take(color_table(), level, axis=0)  # 5x faster than fancy indexing


def encode(rgb: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    """An RGB uint8 array as image file bytes (Pillow's ``fmt`` writer, its options in ``kw``)."""
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt, **kw)
    return buf.getvalue()


def overlay(original: np.ndarray, heatmap_rgb: np.ndarray, amap: np.ndarray, vrange: tuple[float, float],
            level: np.ndarray | None = None) -> np.ndarray:
    """The heatmap blended onto the original image: nearly transparent at the cold end (a normal image
    stays readable), 70 % opaque at the hot end. Integer arithmetic on 1/256 steps of opacity
    (within one grey level of the float blend), with one uint16 temporary per channel pass."""
    level = heat_index(amap, vrange) if level is None else level
    alpha = _alpha_table()[level][..., None]
    out = original.astype(np.uint16)
    out *= 256 - alpha
    out += heatmap_rgb * alpha
    out >>= 8
    return out.astype(np.uint8)


def heat_levels(rgb: np.ndarray) -> np.ndarray:
    """A heatmap read back: each pixel's colour level (0..255, uint8), the inverse of :func:`colorize`
    (exact on the lossless PNGs; a colour off the map, e.g. from a resampled copy, reads as its nearest
    level; of equal colours the higher level)."""
    table = color_table().astype(np.int64)
    codes = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    table_codes = (table[:, 0] << 16) | (table[:, 1] << 8) | table[:, 2]
    known, last = np.unique(table_codes[::-1], return_index=True)
    levels_of = (255 - last).astype(np.uint8)  # the highest level of each distinct colour
    pos = np.minimum(np.searchsorted(known, codes), len(known) - 1)
    out = levels_of[pos]
    off = known[pos] != codes
    if off.any():
        colours, inverse = np.unique(codes[off], return_inverse=True)
        rgb_off = np.stack([colours >> 16, (colours >> 8) & 255, colours & 255], -1)
        out[off] = ((rgb_off[:, None, :] - table[None]) ** 2).sum(-1).argmin(1).astype(np.uint8)[inverse.ravel()]
    return out


def hottest_point(rgb: np.ndarray) -> tuple[int, int]:
    """(row, column) of a heatmap's hottest pixel: of the pixels at the highest colour level, the one
    nearest to their centroid (a saturated patch is marked at its middle, not its top-left corner)."""
    levels = heat_levels(rgb)
    ys, xs = np.nonzero(levels == levels.max())
    i = int(np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2))
    return int(ys[i]), int(xs[i])
