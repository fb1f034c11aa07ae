"""High-resolution inspection: tiles of the working image at the model's input size, their patch
scores stitched onto one grid over the whole image, and the anomaly map at full resolution.

The working image is the original, or the original with its longer side resized to
``tiling.working_size``. Tiles of side ``image.crop`` are taken with stride ``crop x (1 - overlap)``
(rounded down to a multiple of the feature stride, at least one stride); the last row and column are
shifted to end at the border. The working image is padded by mirroring at the bottom and right to
the "canvas": at least one tile, and a whole number of feature cells (at most stride - 1 pixels), so
that every tile starts on a feature cell and the tiles' grids stitch cell on cell. Cells that lie
wholly in the padding are dropped from the stitched grid: they never count for the image score.

Overlapping cells are averaged: a patch near a tile's border is seen with less context there (the
backbone pads with zeros) and scores higher than the same patch seen in the middle of its neighbour
tile; the mean damps those border artefacts, while a real defect is high in every tile that sees it.
The maximum would keep the artefacts.

An image whose tiles would hold more than :data:`MAX_TILE_PIXELS_FACTOR` x image.max_pixels pixels
(a strip a few pixels high, a high overlap, a working size far above the original's) is refused:
:func:`tiling_layout` raises ImageError, and the image's row is an error.

Pure numpy / torch: the stages cut and stitch, the algorithm is unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ImageError
from .preprocessing import geometry
from .scoring import anomaly_map_original, gaussian_blur

# Pixels per patch-feature cell of the registry's backbones (their first level, ResNet layer2 /
# EfficientNet stage 3, has stride 8). Tile origins are multiples of it.
FEATURE_STRIDE = 8


def working_size(height: int, width: int, longer_side: int | None) -> tuple[int, int]:
    """The working image's (height, width): the original's, or its longer side resized to ``longer_side``."""
    if not longer_side:
        return height, width
    scale = longer_side / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def positions(canvas: int, tile: int, step: int) -> tuple[int, ...]:
    """Tile origins along one side: 0, step, 2 step, ... and the last one ending at the canvas border."""
    if canvas <= tile:
        return (0,)
    return tuple(sorted(set(range(0, canvas - tile, step)) | {canvas - tile}))


@dataclass(frozen=True)
class TileLayout:
    """Where an image's tiles lie: original size, working size, canvas and tile origins (pixels)."""
    height: int
    width: int
    work_h: int
    work_w: int
    tile: int
    stride: int
    tops: tuple[int, ...]
    lefts: tuple[int, ...]

    @property
    def canvas(self) -> tuple[int, int]:
        return (max(self.tile, _ceil_to(self.work_h, self.stride)), max(self.tile, _ceil_to(self.work_w, self.stride)))

    @property
    def cells(self) -> tuple[int, int]:
        """The stitched grid: feature cells that cover some pixel of the working image."""
        return -(-self.work_h // self.stride), -(-self.work_w // self.stride)

    @property
    def origins(self) -> list[tuple[int, int]]:
        """(top, left) of every tile, row by row."""
        return [(t, l) for t in self.tops for l in self.lefts]

    def __len__(self) -> int:
        return len(self.tops) * len(self.lefts)


def _ceil_to(n: int, m: int) -> int:
    return -(-n // m) * m


def tile_layout(height: int, width: int, tile: int, overlap: float = 0.25, longer_side: int | None = None,
                stride: int = FEATURE_STRIDE) -> TileLayout:
    """The tiles of an original image of ``height`` x ``width`` pixels."""
    if tile % stride:
        raise ValueError(f"tile side {tile} is not a multiple of the feature stride {stride}")
    wh, ww = working_size(height, width, longer_side)
    step = max(stride, int(tile * (1.0 - overlap)) // stride * stride)
    layout = TileLayout(height, width, wh, ww, tile, stride, (), ())
    ch, cw = layout.canvas
    return TileLayout(height, width, wh, ww, tile, stride, positions(ch, tile, step), positions(cw, tile, step))


def cut_tiles(working: np.ndarray, layout: TileLayout) -> np.ndarray:
    """The working image (work_h x work_w x 3 uint8) -> its tiles [n, tile, tile, 3] uint8, row by row
    (mirrored padding to the canvas)."""
    ch, cw = layout.canvas
    h, w = working.shape[:2]
    padded = np.pad(working, ((0, ch - h), (0, cw - w), (0, 0)), mode="symmetric") if (ch, cw) != (h, w) else working
    t = layout.tile
    return np.stack([padded[y:y + t, x:x + t] for y, x in layout.origins])


def stitch(layout: TileLayout, grids: np.ndarray) -> np.ndarray:
    """Patch-score grids of the tiles [n, g, g] (row by row) -> the stitched grid over the image's
    cells [cells_h, cells_w]: each cell the mean over the tiles that cover it."""
    grids = np.asarray(grids, np.float64)
    if len(grids) != len(layout):
        raise ImageError(f"{len(grids)} tile grids for a layout of {len(layout)} tiles")
    g = grids.shape[1]
    if layout.tile % g or grids.shape[2] != g:
        raise ImageError(f"tile grids of {grids.shape[1]}x{grids.shape[2]} do not divide the tile side {layout.tile}")
    cell = layout.tile // g
    if any(v % cell for v in layout.tops + layout.lefts):
        raise ImageError(f"tile origins are not multiples of the backbone's feature stride {cell}")
    ch, cw = layout.canvas
    total = np.zeros((ch // cell, cw // cell))
    count = np.zeros_like(total)
    for (y, x), grid in zip(layout.origins, grids):
        total[y // cell:y // cell + g, x // cell:x // cell + g] += grid
        count[y // cell:y // cell + g, x // cell:x // cell + g] += 1
    rows, cols = -(-layout.work_h // cell), -(-layout.work_w // cell)
    return (total / count)[:rows, :cols].astype(np.float32)


def image_score(layout: TileLayout, stitched: np.ndarray, tile_grids: np.ndarray, tile_weights: np.ndarray) -> float:
    """The image score: the stitched grid's maximum, times the re-weighting factor of the tile that
    scores that cell highest (1 without re-weighting)."""
    flat = int(np.argmax(stitched))
    cy, cx = divmod(flat, stitched.shape[1])
    g = tile_grids.shape[1]
    cell = layout.tile // g
    best, weight = -np.inf, 1.0
    for (y, x), grid, w in zip(layout.origins, tile_grids, tile_weights):
        ty, tx = cy - y // cell, cx - x // cell
        if 0 <= ty < g and 0 <= tx < g and grid[ty, tx] > best:
            best, weight = grid[ty, tx], float(w)
    return float(stitched[cy, cx]) * weight


# Output rows per strip of :func:`anomaly_map`: its temporaries are a few strips of working rows.
STRIP_ROWS = 256


def anomaly_map(stitched: np.ndarray, layout: TileLayout, sigma: float = 4.0,
                size: tuple[int, int] | None = None) -> np.ndarray:
    """The stitched grid -> the anomaly map at ``size`` (h, w; default the original's): upsampled to
    the working resolution, cropped to the working image, smoothed there (``sigma`` in working pixels,
    as in a tile), then resampled bilinearly to ``size``.

    Drawn in strips of :data:`STRIP_ROWS` output rows, each from the working rows it needs plus the
    smoothing's halo, so memory is the output map and a few strips (a 20 MP image does not need its
    working-resolution map at once); equal to the whole-image computation.
    """
    out_h, out_w = size or (layout.height, layout.width)
    out = np.empty((out_h, out_w), np.float32)
    sy = layout.work_h / out_h
    radius = int(4.0 * sigma + 0.5) if sigma > 0 else 0
    grid = torch.as_tensor(np.asarray(stitched, np.float32))
    xs = ((torch.arange(out_w, dtype=torch.float32) + 0.5) * (layout.work_w / out_w) - 0.5)
    for o0 in range(0, out_h, STRIP_ROWS):
        o1 = min(out_h, o0 + STRIP_ROWS)
        ys = (torch.arange(o0, o1, dtype=torch.float32) + 0.5) * sy - 0.5  # working rows sampled
        lo = max(0, int(np.floor(float(ys[0]))))
        hi = min(layout.work_h, int(np.floor(float(ys[-1]))) + 2)
        window, top = _smoothed_rows(grid, layout, lo, hi, sigma, radius)
        out[o0:o1] = _sample(window, ys - top, xs, layout.work_w)
    return out


def _smoothed_rows(grid: torch.Tensor, layout: TileLayout, lo: int, hi: int, sigma: float, radius: int
                   ) -> tuple[torch.Tensor, int]:
    """Working rows [lo, hi) of the smoothed working-resolution map (and the row they start at): the
    grid upsampled over those rows and the smoothing's halo (rows within ``radius``, plus one cell
    for the bilinear upsampling), smoothed, the halo cut off. At the image's top and bottom the halo
    is the smoothing's own reflection, as for the whole map; elsewhere it is real rows."""
    cell = layout.stride
    a, b = max(0, lo - radius), min(layout.work_h, hi + radius)
    c0, c1 = max(0, a // cell - 1), min(grid.shape[0], -(-b // cell) + 1)
    up = F.interpolate(grid[c0:c1][None, None], scale_factor=cell, mode="bilinear", align_corners=False)[0]
    rows = up[:, a - c0 * cell:b - c0 * cell, :layout.work_w].contiguous()
    return gaussian_blur(rows, sigma)[0][lo - a:hi - a], lo


def _sample(window: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, width: int) -> np.ndarray:
    """Bilinear samples of ``window`` [rows, width] at row coordinates ``ys`` and column coordinates
    ``xs`` (pixel units, clamped at the borders as in torch's align_corners=False resizing)."""
    h = window.shape[0]
    gy = ((ys + 0.5) / h * 2 - 1).clamp(-1, 1)
    gx = ((xs + 0.5) / width * 2 - 1).clamp(-1, 1)
    yy, xx = torch.meshgrid(gy, gx, indexing="ij")
    g = torch.stack([xx, yy], dim=-1)[None]  # grid_sample takes (x, y)
    return F.grid_sample(window[None, None], g, mode="bilinear", padding_mode="border", align_corners=False)[0, 0].numpy()


def anomaly_map_of(scores: torch.Tensor | np.ndarray, grid: tuple[int, int], height: int, width: int, config,
                   size: tuple[int, int] | None = None) -> np.ndarray:
    """One image's patch-score grid (as stored in a score row) -> its anomaly map on the original image
    (at ``size`` when given): through resize and crop, or, with ``config.tiling`` on, the stitched grid
    through the working image."""
    scores = torch.as_tensor(np.asarray(scores, np.float32)[: grid[0] * grid[1]])
    if config.tiling.enabled:
        layout = tiling_layout(height, width, config)
        if tuple(grid) != layout.cells:
            raise ValueError(f"a patch-score grid of {grid[0]}x{grid[1]} for a tiled image of {layout.cells} cells")
        return anomaly_map(scores.reshape(grid).numpy(), layout, config.scoring.sigma, size)
    g = geometry(height, width, config.image.resize, config.image.crop)
    return anomaly_map_original(scores, grid, g, config.scoring.sigma, size)


# The most pixels an image's tiles may hold in all (tiles x image.crop^2), as a multiple of
# image.max_pixels (or of one tile, if that is larger): the tiles of one image are one decode task's
# output, so this bounds its memory (3 bytes a pixel) whatever the image's shape, tiling.overlap or
# tiling.working_size. An image of image.max_pixels fits at overlap up to 0.5 (tiles hold
# 1 / (1 - overlap)^2 times the working image's pixels); a strip a few pixels high (padded to a
# tile's height, each tile mostly padding), overlap 0.9 (~200 tile pixels per pixel) or a working
# size far above the original's are refused above the limit: that image's row is an error.
MAX_TILE_PIXELS_FACTOR = 4


def check_tile_budget(layout: TileLayout, max_pixels: int) -> TileLayout:
    """``layout``, or ImageError if its tiles hold more than :data:`MAX_TILE_PIXELS_FACTOR` x
    ``max_pixels`` pixels (one tile always passes)."""
    budget = MAX_TILE_PIXELS_FACTOR * max(max_pixels, layout.tile * layout.tile)
    held = len(layout) * layout.tile * layout.tile
    if held > budget:
        raise ImageError(
            f"image of {layout.height}x{layout.width} would be {len(layout)} tiles of {layout.tile}x{layout.tile} "
            f"({held} pixels, working image {layout.work_h}x{layout.work_w}), over the limit of "
            f"{MAX_TILE_PIXELS_FACTOR} x image.max_pixels={max_pixels} tile pixels; lower tiling.overlap or "
            f"tiling.working_size, or score it untiled")
    return layout


def tiling_layout(height: int, width: int, config):
    """The tile layout of an original image of ``height`` x ``width`` under ``config`` (image.crop, tiling);
    ImageError for an image whose tiles are over the limit (:func:`check_tile_budget`)."""
    t = config.tiling
    layout = tile_layout(height, width, config.image.crop, t.overlap, t.working_size)
    return check_tile_budget(layout, config.image.max_pixels)
