"""Tiled scoring on the driver: the scoring actors' tile rows -> one row per image.

The decode tasks cut each image into tiles (:func:`.stages.decode_tiles`) and the scoring actors score
tiles in batches, whatever image they came from, so one large image is spread over every actor. The
driver collects an image's tiles as they arrive (a retried task's repeated tiles are dropped), and
once all of them are in, stitches their patch-score grids (:mod:`..core.tiling`) into the image's row:
its score, its stitched grid, its times. An image with any failed tile gets an error row, never a
partial score. Only the tiles' small grids are held, never pixels.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from ..config import Config
from ..core import tiling
from ..core.tiling import tiling_layout

SUMMED = ("decode_ms", "score_ms")


class TileAssembler:
    """Tile rows in, image rows out (:meth:`add` returns the images its batch completed)."""

    def __init__(self, config: Config):
        self.config = config
        self.pending: dict[int, dict[int, dict]] = defaultdict(dict)

    def add(self, batch: dict) -> dict | None:
        """One batch of tile rows; returns a batch of the images now complete (or None)."""
        done = []
        for i in range(len(batch["idx"])):
            row = {k: v[i] for k, v in batch.items()}
            image = self.pending[int(row["idx"])]
            image.setdefault(int(row["tile"]), row)
            if len(image) == int(row["tiles"]):
                done.append(self.assemble([image[t] for t in sorted(image)]))
                del self.pending[int(row["idx"])]
        return as_batch(done) if done else None

    @property
    def incomplete(self) -> int:
        """Images with some but not all of their tiles in (none once the stream has ended, unless lost)."""
        return len(self.pending)

    def assemble(self, tiles: list[dict]) -> dict:
        """An image's tile rows (in tile order) -> its row."""
        row = dict(tiles[0])
        for k in SUMMED:
            if k in row:
                row[k] = float(sum(float(t[k]) for t in tiles))
        failed = [(int(t["tile"]), str(t["error"])) for t in tiles if isinstance(t["error"], str) and t["error"]]
        if failed:
            first, why = failed[0]
            row["error"] = why if len(tiles) == 1 else f"tile {first + 1} of {len(tiles)} failed ({len(failed)} " \
                                                       f"failed in all): {why}"
            row.update(score=np.nan, patch_scores=np.zeros(0, np.float32), grid_h=0, grid_w=0)
            return row
        if row.get("unchanged") or "score" not in row:
            return row
        layout = tiling_layout(int(row["height"]), int(row["width"]), self.config)
        g = int(tiles[0]["grid_h"])
        grids = np.stack([np.asarray(t["patch_scores"], np.float32)[: g * g].reshape(g, g) for t in tiles])
        weights = [_weight(float(t["score"]), grid) for t, grid in zip(tiles, grids)]
        stitched = tiling.stitch(layout, grids)
        row.update(score=tiling.image_score(layout, stitched, grids, np.asarray(weights)),
                   patch_scores=stitched.ravel(), grid_h=stitched.shape[0], grid_w=stitched.shape[1])
        return row


def _weight(score: float, grid: np.ndarray) -> float:
    """A tile's re-weighting factor: its (re-weighted) score over its largest patch score (1 without)."""
    peak = float(grid.max())
    return score / peak if peak > 0 and np.isfinite(score) else 1.0


def as_batch(rows: list[dict]) -> dict:
    """Row dicts -> a batch of columns (numpy arrays; grids of different sizes as an object column)."""
    out = {}
    for k in rows[0]:
        values = [r.get(k) for r in rows]
        if k == "patch_scores" or any(isinstance(v, np.ndarray) and v.ndim for v in values):
            col = np.empty(len(values), object)
            for j, v in enumerate(values):  # one by one: numpy would broadcast grids of equal size
                col[j] = np.asarray(v, np.float32) if k == "patch_scores" else v
            out[k] = col
        else:
            out[k] = np.asarray(values, dtype=object if any(isinstance(v, (str, bytes)) for v in values) else None)
    return out
