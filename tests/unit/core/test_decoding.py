"""Decoding hostile files: only allowed formats reach a Pillow plugin, the pixel limit is the
setting's, fixed intensity scales, first frames, large JPEGs decoded at a reduced scale; the model's
crop resampled from its window of the original only (a thin strip is never enlarged whole)."""
from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import ROOT
from PIL import Image

from patchcore_dist.core.preprocessing import (ALLOWED_FORMATS, decode_image, decode_sized, geometry, resize_crop,
                                               to_original)
from patchcore_dist.errors import ImageError
from patchcore_dist.render.heatmap import render_size


EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n"
       b"newpath 0 0 moveto 64 64 lineto stroke\nshowpage\n%%EOF\n")


def _encode(img, fmt="PNG", **kw):
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _photo(h=96, w=128):
    import skimage.data
    return np.asarray(Image.fromarray(skimage.data.astronaut()).resize((w, h)))


def test_formats_outside_the_allow_list_never_reach_their_plugin(monkeypatch):
    from PIL import EpsImagePlugin, GifImagePlugin
    for plugin in (EpsImagePlugin.EpsImageFile, GifImagePlugin.GifImageFile):
        monkeypatch.setattr(plugin, "_open", lambda self: pytest.fail(f"{type(self).__name__} parsed the file"))
    with pytest.raises(ImageError, match=r"image format EPS is not decoded \(allowed: PNG, JPEG, BMP, TIFF, WEBP\)"):
        decode_image(EPS)
    gif = _encode(Image.fromarray(_photo()).convert("P"), "GIF")
    with pytest.raises(ImageError, match="image format GIF is not decoded"):
        decode_image(gif)


@pytest.mark.parametrize("fmt", ALLOWED_FORMATS)
def test_every_allowed_format_decodes(fmt):
    rgb = _photo()
    kw = {"lossless": True} if fmt == "WEBP" else {"quality": 95} if fmt == "JPEG" else {}
    out = decode_image(_encode(Image.fromarray(rgb), fmt, **kw))
    assert out.shape == rgb.shape and np.abs(out.astype(int) - rgb).mean() < 5  # JPEG is lossy


@pytest.mark.parametrize("fmt", ["TIFF", "PNG", "WEBP"])
def test_the_first_frame_of_a_multi_frame_file_is_used(fmt):
    first, second = _photo(), 255 - _photo()
    frames = [Image.fromarray(first), Image.fromarray(second)]
    kw = {"lossless": True} if fmt == "WEBP" else {}
    data = _encode(frames[0], fmt, save_all=True, append_images=frames[1:], **kw)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    assert np.abs(decode_image(data).astype(int) - first).mean() < 3


def test_32_bit_images_have_a_fixed_scale():
    flat = np.full((64, 64), 30000, np.int32)
    flat[:, :32] = 30003  # nearly constant: must stay nearly constant, not stretched to 0..255
    out = decode_image(_encode(Image.fromarray(flat), "TIFF"))
    assert out.min() == out.max() == round(30000 / 257)
    ints = np.array([[-5, 0, 65535, 70000]] * 16, np.int32).repeat(4, 1)
    assert decode_image(_encode(Image.fromarray(ints), "TIFF"))[0, ::4, 0].tolist() == [0, 0, 255, 255]
    floats = np.array([[-1.0, 0.0, 0.5, 1.0, 7.0]] * 16, np.float32).repeat(4, 1)
    assert decode_image(_encode(Image.fromarray(floats), "TIFF"))[0, ::4, 0].tolist() == [0, 0, 128, 255, 255]


def test_max_pixels_is_the_only_pixel_limit(monkeypatch):
    data = _encode(Image.fromarray(_photo()))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # as if Pillow's own limit were below the setting
    assert decode_image(data, max_pixels=96 * 128).shape == (96, 128, 3)
    with pytest.raises(ImageError, match="over the limit image.max_pixels=12000"):
        decode_image(data, max_pixels=12000)
    assert Image.MAX_IMAGE_PIXELS == 1000  # restored


def test_a_large_jpeg_decodes_at_a_reduced_scale_for_the_model():
    big = np.asarray(Image.fromarray(_photo(1536, 2048)))
    data = _encode(Image.fromarray(big), "JPEG", quality=95)
    small, size = decode_sized(data, shorter_side=2 * 256)
    assert size == (1536, 2048) and small.shape == (768, 1024, 3)  # libjpeg's 1/2 scale: still >= 512
    full, _ = decode_sized(data)
    assert full.shape == (1536, 2048, 3)
    a, b = resize_crop(small, 256, 224, size=size), resize_crop(full, 256, 224)
    assert a.shape == b.shape == (224, 224, 3) and np.abs(a.astype(int) - b).mean() < 2  # the same crop
    png = _encode(Image.fromarray(big))
    assert decode_sized(png, shorter_side=512)[0].shape == (1536, 2048, 3)  # other formats: full size


def test_huge_originals_are_rendered_at_a_capped_size():
    assert render_size(3000, 4000) == (3000, 4000)
    h, w = render_size(30000, 40000)
    assert h * w <= 16_777_216 and abs(w / h - 4 / 3) < 1e-3 and h * w > 16_000_000
    g = geometry(300, 400, 256, 224)
    yy, xx = np.mgrid[0:224, 0:224] / 224.0
    amap = (np.exp(-((yy - 0.4) ** 2 + (xx - 0.6) ** 2) / 0.02) + 0.3 * xx).astype(np.float32)
    full, coarse = to_original(amap, g), to_original(amap, g, size=(150, 200))
    assert coarse.shape == (150, 200)
    assert np.abs(full.reshape(150, 2, 200, 2).mean((1, 3)) - coarse).max() < 0.02


def _resize_then_crop(rgb, resize, crop, size=None):
    """The crop as it was made before the crop was taken in source coordinates: the whole image resized."""
    g = geometry(*(size or rgb.shape[:2]), resize, crop)
    img = Image.fromarray(rgb).resize((g.resized_w, g.resized_h), Image.BILINEAR)
    return np.asarray(img)[g.top:g.top + crop, g.left:g.left + crop]


def _skimage_photos():
    import skimage.data
    out = {}
    for name in ("astronaut", "chelsea", "coffee", "camera", "rocket", "hubble_deep_field", "retina", "brick"):
        a = np.asarray(getattr(skimage.data, name)())
        out[name] = np.ascontiguousarray(np.stack([a] * 3, -1) if a.ndim == 2 else a[..., :3])
    out["strip"] = np.tile(out["astronaut"][200:216], (1, 10, 1))  # 16 x 5120: enlarged 16 times
    out["column"] = np.ascontiguousarray(out["coffee"][:, 100:120])  # 400 x 20
    out["small"] = np.ascontiguousarray(out["chelsea"][:100, :130])  # enlarged
    return out


@pytest.mark.parametrize("resize,crop", [(256, 224), (128, 128), (320, 256), (1024, 1000)])
def test_the_crop_taken_in_source_coordinates_equals_resizing_the_whole_image(resize, crop):
    """resize_crop resamples only the crop's window of the original; the pixels are those of resizing the
    whole image then cropping it (the score and the anomaly map's geometry see the same crop)."""
    for name, rgb in _skimage_photos().items():
        new, old = resize_crop(rgb, resize, crop), _resize_then_crop(rgb, resize, crop)
        diff = np.abs(new.astype(int) - old)
        assert new.shape == (crop, crop, 3) and diff.max() <= 1 and diff.mean() < 0.02, (name, diff.max(), diff.mean())
    rgb = _skimage_photos()["astronaut"]
    reduced = np.ascontiguousarray(rgb[::2, ::2])  # as decoded at a reduced scale, with the original's size
    assert np.abs(resize_crop(reduced, 256, 224, size=(512, 512)).astype(int)
                  - _resize_then_crop(reduced, 256, 224, size=(512, 512))).max() <= 1


def test_a_thin_strip_is_not_enlarged_whole(monkeypatch):
    """A 16 x 200,000 PNG (a strip of a photograph): enlarging it whole to the model's shorter side made
    256 x 3.2M pixels (8.7 GB peak); only the crop's window of the original is resampled now."""
    import skimage.data
    strip = np.tile(skimage.data.astronaut()[200:216], (1, 200_000 // 512 + 1, 1))[:, :200_000]
    rgb, size = decode_sized(_encode(Image.fromarray(strip)), shorter_side=512)
    assert size == (16, 200_000)
    resized = []
    real = Image.Image.resize
    monkeypatch.setattr(Image.Image, "resize", lambda self, *a, **k: resized.append(self.size) or real(self, *a, **k))
    out = resize_crop(rgb, 256, 224, size=size)
    assert out.shape == (224, 224, 3) and len(resized) == 1
    w, h = resized[0]
    assert h == 16 and w <= 224 * 16 / 256 + 8  # the crop's 14 source columns and the filter's margin
    g = geometry(16, 200_000, 256, 224)
    x0, x1 = g.left * 16 // 256, (g.left + 224) * 16 // 256  # the crop's source columns (scale 1/16, exact)
    assert (x0, x1) == (99_993, 100_007)
    part = np.ascontiguousarray(strip[:, x0 - 5000:x1 + 5000])  # the same centre crop as the whole strip's
    assert np.abs(out.astype(int) - _resize_then_crop(part, 256, 224)).max() <= 1


def test_the_crop_step_of_a_thin_strip_stays_small_in_memory(tmp_path):
    """Decoding and cropping the 16 x 200,000 strip, measured in a fresh process: its peak resident
    memory grows by tens of MB (the decoded strip is 9.6 MB), not by the 8.6 GB it took before."""
    import skimage.data
    strip = np.tile(skimage.data.astronaut()[200:216], (1, 200_000 // 512 + 1, 1))[:, :200_000]
    Image.fromarray(strip).save(tmp_path / "strip.png")
    code = ("import resource, sys; from patchcore_dist.core.preprocessing import decode_sized, resize_crop; "
            "data = open(sys.argv[1], 'rb').read(); r = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
            "before = r(); rgb, size = decode_sized(data, shorter_side=512); "
            "crop = resize_crop(rgb, 256, 224, size=size); print(crop.shape, (r() - before) // 1024)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "strip.png")], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stderr[-2000:]
    shape, grown_mb = out.stdout.rsplit(")", 1)
    assert shape == "(224, 224, 3" and int(grown_mb) < 200, out.stdout


def test_the_map_of_a_thin_strip_is_drawn_at_its_render_size_only():
    """to_original samples the crop's map at the output's pixels: a strip's map is the size of the
    strip (or of its render size), never of the strip enlarged to the model's resolution."""
    g = geometry(16, 200_000, 256, 224)
    amap = np.random.default_rng(0).random((224, 224)).astype(np.float32)
    out = to_original(amap, g, size=render_size(16, 200_000))
    assert out.shape == (16, 200_000)
    inside = out[:, int(g.left * 16 / 256) + 2:int((g.left + 224) * 16 / 256) - 2]
    assert inside.size and inside.std() > 0  # the crop's footprint: 14 columns of the original
    assert np.all(out[:, :1000] == out[:, :1000][:, :1])  # outside: the border value, column by column
