"""Tile geometry, stitching and the tiled anomaly map (core/tiling.py)."""
from __future__ import annotations

import numpy as np
import pytest

from patchcore_dist.config import load_config
from patchcore_dist.core import tiling
from patchcore_dist.core.tiling import anomaly_map_of, tiling_layout
from patchcore_dist.errors import ConfigError


@pytest.mark.parametrize("h,w,tile,overlap,longer", [(1000, 1500, 224, 0.25, None), (2000, 3000, 224, 0.5, 1024),
                                                     (480, 640, 128, 0.0, None), (225, 224, 224, 0.25, None),
                                                     (333, 97, 64, 0.3, None)])
def test_tiles_cover_the_working_image_and_end_at_the_border(h, w, tile, overlap, longer):
    lay = tiling.tile_layout(h, w, tile, overlap, longer)
    ch, cw = lay.canvas
    assert ch % 8 == 0 and cw % 8 == 0 and ch >= lay.work_h and cw >= lay.work_w
    assert ch - lay.work_h < 8 or ch == tile  # padding: less than one cell, or up to one tile
    covered = np.zeros((ch, cw), bool)
    for y, x in lay.origins:
        assert y % 8 == 0 and x % 8 == 0 and y + tile <= ch and x + tile <= cw
        covered[y:y + tile, x:x + tile] = True
    assert covered.all()
    assert lay.tops[-1] + tile == ch and lay.lefts[-1] + tile == cw  # the last row / column ends at the border
    step = max(8, int(tile * (1 - overlap)) // 8 * 8)
    assert all(b - a <= step for a, b in zip(lay.tops, lay.tops[1:]))
    if longer:
        assert max(lay.work_h, lay.work_w) == longer


def test_an_image_smaller_than_a_tile_is_one_padded_tile():
    lay = tiling.tile_layout(100, 60, 128)
    assert len(lay) == 1 and lay.canvas == (128, 128) and lay.cells == (13, 8)
    img = np.arange(100 * 60 * 3, dtype=np.uint32).reshape(100, 60, 3).astype(np.uint8)
    tiles = tiling.cut_tiles(img, lay)
    assert tiles.shape == (1, 128, 128, 3)
    assert np.array_equal(tiles[0, :100, :60], img)
    assert np.array_equal(tiles[0, 100:128, :60], img[::-1][:28])  # mirrored, not black


def test_stitching_averages_overlaps_by_hand():
    # tile 16 px = 2 x 2 cells of 8 px; a 24 x 24 image with 50 % overlap: origins 0 and 8 on each axis
    lay = tiling.tile_layout(24, 24, 16, overlap=0.5)
    assert lay.origins == [(0, 0), (0, 8), (8, 0), (8, 8)]
    grids = np.stack([np.full((2, 2), v, np.float32) for v in (1, 2, 3, 4)])
    grids[3, 1, 1] = 10.0  # the bottom-right cell is seen by the last tile only
    expected = np.array([[1, 1.5, 2], [2, 2.5, 3], [3, 3.5, 10]], np.float32)
    assert np.allclose(tiling.stitch(lay, grids), expected)
    assert tiling.image_score(lay, expected, grids, np.ones(4)) == pytest.approx(10.0)
    assert tiling.image_score(lay, expected, grids, np.array([1, 1, 1, 0.5])) == pytest.approx(5.0)


def test_cells_in_the_padding_do_not_count():
    lay = tiling.tile_layout(20, 20, 16, overlap=0.5)  # canvas 24: the last cell row and column are 4 px of image
    assert lay.cells == (3, 3)
    lay = tiling.tile_layout(16, 20, 16, overlap=0.5)  # 16 rows: the third cell row is padding only
    grids = np.zeros((len(lay), 2, 2), np.float32)
    assert tiling.stitch(lay, grids).shape == (2, 3)


def test_stitching_refuses_a_wrong_tile_count():
    lay = tiling.tile_layout(24, 24, 16, overlap=0.5)
    with pytest.raises(Exception, match="4 tiles"):
        tiling.stitch(lay, np.zeros((3, 2, 2)))


def test_tiled_anomaly_map_is_at_the_original_size_and_peaks_at_the_defect():
    cfg = load_config(overrides=["tiling.enabled=true", "image.crop=64", "image.resize=64"])
    lay = tiling_layout(300, 500, cfg)
    grid = np.zeros(lay.cells, np.float32)
    grid[10, 40] = 5.0  # cell (10, 40): pixels 80..88 x 320..328
    amap = anomaly_map_of(grid.ravel(), lay.cells, 300, 500, cfg)
    assert amap.shape == (300, 500)
    y, x = np.unravel_index(np.argmax(amap), amap.shape)
    assert 78 <= y <= 90 and 318 <= x <= 330
    small = anomaly_map_of(grid.ravel(), lay.cells, 300, 500, cfg, size=(150, 250))
    assert small.shape == (150, 250)
    with pytest.raises(ValueError, match="grid"):
        anomaly_map_of(np.zeros(12), (3, 4), 300, 500, cfg)


def test_tiling_config_is_checked_and_part_of_the_feature_identity():
    plain = load_config()
    tiled = load_config(overrides=["tiling.enabled=true"])
    assert "tiling" not in plain.feature_dict() and tiled.feature_digest() != plain.feature_digest()
    assert load_config(overrides=["tiling.enabled=true", "tiling.working_size=1024"]).feature_digest() != \
        tiled.feature_digest()
    with pytest.raises(ConfigError, match="multiple of 8"):
        load_config(overrides=["tiling.enabled=true", "image.crop=220"])
    with pytest.raises(ConfigError, match="per_position"):
        load_config(overrides=["tiling.bank=per_position"])
    with pytest.raises(ConfigError, match="overlap"):
        load_config(overrides=["tiling.overlap=1.0"])


@pytest.mark.parametrize("size", [None, (401, 333), (1500, 900)])
def test_the_map_drawn_in_strips_equals_the_whole_map(size, monkeypatch):
    """Strips of a few rows (each with its smoothing halo) give the map computed in one piece."""
    import torch
    import torch.nn.functional as F

    from patchcore_dist.core.scoring import gaussian_blur
    lay = tiling.tile_layout(700, 420, 64, 0.25)
    grid = np.random.default_rng(1).random(lay.cells).astype(np.float32) * 3
    monkeypatch.setattr(tiling, "STRIP_ROWS", 37)
    strips = tiling.anomaly_map(grid, lay, 4.0, size)
    up = F.interpolate(torch.from_numpy(grid)[None, None], scale_factor=8, mode="bilinear", align_corners=False)[0]
    whole = gaussian_blur(up[:, :lay.work_h, :lay.work_w].contiguous(), 4.0)
    if size:
        whole = F.interpolate(whole[None], size=size, mode="bilinear", align_corners=False)[0]
    assert strips.shape == (size or (700, 420))
    assert np.allclose(strips, whole[0].numpy(), atol=1e-5)
