"""The driver's tile assembly (pipeline/tiles.py): tile rows in any order and with repeats -> one row
per image, stitched; a failed tile makes the image an error row."""
from __future__ import annotations

import numpy as np

from patchcore_dist.config import load_config
from patchcore_dist.core import tiling
from patchcore_dist.pipeline.tiles import TileAssembler

CFG = load_config(overrides=["tiling.enabled=true", "image.resize=16", "image.crop=16", "tiling.overlap=0.5"])


def _tile_rows(idx: int, grids: np.ndarray, scores=None, errors=None) -> list[dict]:
    n = len(grids)
    return [{"idx": idx, "uri": f"img{idx}.png", "tile": t, "tiles": n, "height": 24, "width": 24,
             "error": (errors or {}).get(t, ""), "unchanged": False, "decode_ms": 1.0, "score_ms": 2.0,
             "score": float(grids[t].max()) if scores is None else scores[t], "patch_scores": grids[t].ravel(),
             "grid_h": 2, "grid_w": 2} for t in range(n)]


def _batch(rows: list[dict]) -> dict:
    return {k: np.array([r[k] for r in rows], dtype=object if k in ("uri", "error", "patch_scores") else None)
            for k in rows[0]}


def test_an_image_is_emitted_once_all_its_tiles_are_in_stitched():
    grids = np.stack([np.full((2, 2), v, np.float32) for v in (1, 2, 3, 4)])
    grids[3, 1, 1] = 10.0
    a, b = _tile_rows(0, grids), _tile_rows(1, grids * 2)
    asm = TileAssembler(CFG)
    assert asm.add(_batch([a[3], b[0], a[1]])) is None  # out of order, interleaved
    assert asm.add(_batch([a[1], a[0]])) is None  # a repeated tile (a retried task) is dropped
    out = asm.add(_batch([a[2], b[1], b[2]]))
    assert list(out["idx"]) == [0] and asm.incomplete == 1
    lay = tiling.tile_layout(24, 24, 16, 0.5)
    expected = tiling.stitch(lay, grids)
    assert np.allclose(out["patch_scores"][0], expected.ravel()) and (out["grid_h"][0], out["grid_w"][0]) == (3, 3)
    assert out["score"][0] == 10.0 and out["decode_ms"][0] == 4.0 and out["score_ms"][0] == 8.0
    out = asm.add(_batch([b[3]]))
    assert list(out["idx"]) == [1] and out["score"][0] == 20.0 and asm.incomplete == 0


def test_one_failed_tile_makes_an_error_row_never_a_partial_score():
    grids = np.ones((4, 2, 2), np.float32)
    rows = _tile_rows(5, grids, errors={2: "scoring failed: boom"})
    out = TileAssembler(CFG).add(_batch(rows))
    assert out["error"][0] == "tile 3 of 4 failed (1 failed in all): scoring failed: boom"
    assert np.isnan(out["score"][0]) and out["grid_h"][0] == 0


def test_the_reweighting_factor_of_the_tile_that_sees_the_maximum_applies():
    grids = np.ones((4, 2, 2), np.float32)
    grids[3, 1, 1] = 8.0  # seen by the last tile only
    scores = [1.0, 1.0, 1.0, 4.0]  # that tile's re-weighted score: factor 0.5
    out = TileAssembler(CFG).add(_batch(_tile_rows(0, grids, scores=scores)))
    assert out["score"][0] == 4.0
