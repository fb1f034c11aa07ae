"""Heatmap rendering: the fast integer colouring, blending and PNG settings show what the float ones did."""
import io

import numpy as np
import torch
from PIL import Image

from patchcore_dist.core.preprocessing import decode_image, geometry, resize_crop
from patchcore_dist.core.scoring import anomaly_map_original
from patchcore_dist.render import heatmap as hm
from patchcore_dist.synthetic.photos import _photo as load_photo


def _map_and_photo():
    """A real photograph and a smooth anomaly map over it (its own brightness as scores)."""
    photo = np.asarray(load_photo("coffee"))
    h, w = photo.shape[:2]
    g = geometry(h, w, 256, 224)
    patches = resize_crop(photo, 256, 224)[4::8, 4::8].mean(-1) / 64.0  # 28 x 28 patch scores
    amap = anomaly_map_original(torch.from_numpy(patches.astype(np.float32)).reshape(-1), (28, 28), g, 4.0)
    return photo, amap


def test_colours_and_overlay_match_the_float_rendering():
    photo, amap = _map_and_photo()
    vrange = (float(np.quantile(amap, 0.2)), float(np.quantile(amap, 0.9)))  # some pixels clipped at each end
    level = hm.heat_index(amap, vrange)
    float_level = hm.heat_level(amap, vrange)
    assert np.abs(level.astype(np.int32) - np.rint(float_level * 255)).max() <= 1
    rgb = hm.colorize(amap, vrange, level)
    assert rgb.shape == photo.shape and rgb.dtype == np.uint8
    assert np.array_equal(rgb, hm.color_table()[level])
    alpha = (0.1 + 0.6 * float_level)[..., None]
    blended = photo * (1 - alpha) + rgb * alpha
    over = hm.overlay(photo, rgb, amap, vrange, level)
    assert np.abs(over.astype(np.float32) - blended).max() <= 2.0
    assert np.array_equal(over, hm.overlay(photo, rgb, amap, vrange))  # level computed inside: the same


def test_heatmap_png_is_lossless_at_the_fast_settings():
    _, amap = _map_and_photo()
    rgb = hm.colorize(amap, (float(amap.min()), float(amap.max())))
    png = hm.encode(rgb, **hm.PNG_OPTIONS)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), rgb)
    assert np.array_equal(decode_image(png), decode_image(hm.encode(rgb)))


def test_heat_levels_read_a_heatmap_back_and_find_its_hottest_point():
    _, amap = _map_and_photo()
    vrange = (float(np.quantile(amap, 0.2)), float(amap.max()) + 1e-3)  # nothing saturated at the hot end
    rgb = hm.colorize(amap, vrange)
    png = np.asarray(Image.open(io.BytesIO(hm.encode(rgb, **hm.PNG_OPTIONS))).convert("RGB"))
    level = hm.heat_index(amap, vrange)
    back = hm.heat_levels(png)
    assert np.array_equal(hm.color_table()[back], rgb)  # the same colours
    shared = np.isin(level, [29, 30, 31, 32])  # jet draws these four levels in one colour: read as the highest
    assert np.array_equal(back[~shared], level[~shared]) and np.all(back[shared] == 32)
    y, x = hm.hottest_point(png)
    assert level[y, x] == level.max() and amap[y, x] >= np.quantile(amap, 0.999)
    jpeg = np.asarray(Image.open(io.BytesIO(hm.encode(rgb, "JPEG", quality=90))))  # colours off the map: nearest
    assert np.abs(hm.heat_levels(jpeg).astype(int) - level).mean() < 8
