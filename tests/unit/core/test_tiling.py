"""Tile geometry, stitching and the tiled anomaly map (core/tiling.py)."""
from __future__ import annotations

import numpy as np
import pytest

from patchcore_dist import config as config_module
from patchcore_dist.config import load_config
from patchcore_dist.core import tiling
from patchcore_dist.core.tiling import anomaly_map_of, tiling_layout
from patchcore_dist.errors import ConfigError, ImageError


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


def test_an_image_whose_tiles_would_be_over_the_limit_is_refused():
    """A 16 x 6.25M strip (image.max_pixels) was 37,203 padded tiles (5.2 GiB); overlap 0.9 or a working
    size far above the original's multiplied tiles without bound. Tiles hold at most
    MAX_TILE_PIXELS_FACTOR x image.max_pixels pixels; ordinary images and settings stay well within."""
    cfg = load_config(overrides=["tiling.enabled=true"])
    assert len(tiling.tile_layout(16, 6_250_000, 224, 0.25)) == 37_203  # the finding's count, unrefused
    with pytest.raises(ImageError, match=r"image of 16x6250000 would be 37203 tiles of 224x224 .* over the limit "
                                         r"of 4 x image.max_pixels=100000000 tile pixels; lower tiling.overlap"):
        tiling_layout(16, 6_250_000, cfg)
    assert len(tiling_layout(16, 200_000, cfg)) == 1191  # a shorter strip: 60 M tile pixels
    assert len(tiling_layout(10_000, 10_000, cfg)) == 3600  # image.max_pixels at the default overlap
    half = load_config(overrides=["tiling.enabled=true", "tiling.overlap=0.5"])
    assert len(tiling_layout(10_000, 10_000, half)) * 224 ** 2 <= 4 * 100_000_000  # and at overlap 0.5
    dense = load_config(overrides=["tiling.enabled=true", "tiling.overlap=0.9"])
    assert len(tiling_layout(1000, 1000, dense)) == 2500
    with pytest.raises(ImageError, match="would be 30625 tiles"):
        tiling_layout(3000, 3000, dense)  # 196 tile pixels per pixel: 1.5 G pixels
    huge = load_config(overrides=["tiling.enabled=true", f"tiling.working_size={config_module.MAX_WORKING}"])
    with pytest.raises(ImageError, match="working image 32768x32768"):
        tiling_layout(1000, 1000, huge)  # a 1000 x 1000 image worked on at 1 G pixels
    tiny = load_config(overrides=["tiling.enabled=true", "image.max_pixels=20000"])  # below one tile's 50,176
    assert len(tiling_layout(100, 100, tiny)) == 1  # one tile always passes: the budget is of 4 tiles then
    with pytest.raises(ImageError, match="would be 7 tiles"):
        tiling_layout(16, 1200, tiny)


def test_the_decode_stage_gives_a_refused_image_one_error_row(tmp_path, monkeypatch):
    """The tiled decode stage checks the layout before it makes the working image: a strip of a
    photograph over the limit is one error row with the reason, the next image its tiles."""
    import skimage.data
    from PIL import Image

    from patchcore_dist.pipeline import stages
    worked = []
    monkeypatch.setattr(stages, "resize_rgb", lambda rgb, size: worked.append(size) or rgb)
    photo = skimage.data.astronaut()
    Image.fromarray(np.tile(photo[200:216], (1, 118, 1))).save(tmp_path / "strip.png")  # 16 x 60,416
    Image.fromarray(photo).save(tmp_path / "photo.png")
    cfg = load_config(overrides=["tiling.enabled=true", "image.max_pixels=1000000"])
    rows = []
    for name in ("strip.png", "photo.png"):
        uri = np.array([str(tmp_path / name)], object)
        rows.append(stages.decode_tiles({"uri": uri, "rel": uri}, cfg.to_dict()))
    strip, ok = rows
    assert len(strip["crop"]) == 1 and strip["tiles"].tolist() == [1]
    assert strip["error"][0].startswith("image of 16x60416 would be 360 tiles of 224x224 (18063360 pixels")
    assert (strip["height"][0], strip["width"][0]) == (16, 60_416)
    assert len(ok["crop"]) == 9 and not any(ok["error"])  # 512 x 512: 3 x 3 tiles
    assert worked == [(512, 512)]  # the strip's working image was never made
