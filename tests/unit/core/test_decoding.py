"""Decoding hostile files: only allowed formats reach a Pillow plugin, the pixel limit is the
setting's, fixed intensity scales, first frames, large JPEGs decoded at a reduced scale."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageChops

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
