"""Image decoding and preprocessing as the original PatchCore: resize the shorter side, centre crop,
ImageNet normalisation. Also the inverse geometry, to put an anomaly map back on the original image.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import io
import threading
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from ..errors import ImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


# Decoded formats (Pillow plugin names), checked before any plugin parses the bytes: the others
# (EPS through Ghostscript, PSD, FITS, ...) are never reached, whatever the file's extension.
ALLOWED_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP")


def _to_rgb8(img: Image.Image) -> Image.Image:
    """Any PIL mode (1, L, P, RGBA, LA, CMYK, I;16, I, F, ...) -> 8-bit RGB, on fixed scales (never
    stretched per image, so a nearly constant image stays nearly constant): 16-bit and 32-bit integer
    values are 16-bit intensities (0..65535 -> 0..255, clipped), floats are 0.0..1.0 (clipped)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        arr = np.clip(arr, 0.0, 1.0) * 255.0 if img.mode == "F" else np.clip(arr, 0, 65535) / 257.0
        img = Image.fromarray(np.rint(arr).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB") if img.mode != "RGB" else img


@functools.lru_cache(maxsize=1)
def _signatures() -> tuple:
    Image.init()  # every plugin registered: its accept() is a check of the first bytes, no parsing
    return tuple((name, accept) for name, (_, accept) in sorted(Image.OPEN.items()) if accept)


def found_format(data: bytes) -> str | None:
    """The image format the file's first bytes announce (by Pillow's signatures), without parsing it."""
    prefix = data[:16]
    return next((name for name, accept in _signatures() if accept(prefix)), None)


_LIMITS_LOCK = threading.Lock()
_LIMITS: dict = {"active": collections.Counter(), "before": None}  # the limits of the decodes under way


@contextlib.contextmanager
def _pixel_limit(max_pixels: int):
    """Pillow's decompression-bomb limit at least ``max_pixels`` while one image is decoded (so the setting
    is the only pixel limit: _open checks each image against its own ``max_pixels``), restored after the
    last decode. Thread-safe: concurrent decodes (the local executor's threads, other configs) share
    Pillow's one global limit, set under a lock to the largest limit under way."""
    with _LIMITS_LOCK:
        active = _LIMITS["active"]
        if not active:
            _LIMITS["before"] = Image.MAX_IMAGE_PIXELS
        active[max_pixels] += 1
        Image.MAX_IMAGE_PIXELS = max(active)
    try:
        yield
    finally:
        with _LIMITS_LOCK:
            active[max_pixels] -= 1
            if not active[max_pixels]:
                del active[max_pixels]
            Image.MAX_IMAGE_PIXELS = max(active) if active else _LIMITS["before"]


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Encoded bytes -> an opened (not yet decoded) Pillow image of an allowed format, its first frame,
    within ``max_pixels``; ImageError otherwise. Runs under :func:`_pixel_limit`."""
    if len(data) == 0:
        raise ImageError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"image is over the limit image.max_pixels={max_pixels}: {e}") from None
    except Image.UnidentifiedImageError:
        fmt = found_format(data)
        if fmt:
            raise ImageError(f"image format {fmt} is not decoded (allowed: {', '.join(ALLOWED_FORMATS)})") from None
        raise ImageError("not a recognised image format") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"corrupt or truncated image: {e}") from None
    w, h = img.size
    if w * h > max_pixels:
        raise ImageError(f"image has {w}x{h} = {w * h} pixels, over the limit image.max_pixels={max_pixels}")
    return img


def decode_sized(data: bytes, max_pixels: int = 100_000_000, min_side: int = 16,
                 shorter_side: int | None = None, longer_side: int | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """Encoded bytes -> (HxWx3 uint8 RGB with EXIF orientation applied, the original (height, width)).

    The first frame of a multi-frame file (TIFF pages, APNG, animated WebP) is used. ``shorter_side``:
    the caller needs no more than this many pixels on the shorter side; a JPEG at least twice as large
    is decoded by libjpeg at 1/2, 1/4 or 1/8 scale (still at least ``shorter_side``), which bounds the
    memory of large photographs. ``longer_side``: the same, for a caller that needs this many pixels on
the longer side (a tiled working image). The returned size is the original's either way.
    """
    with _pixel_limit(max_pixels):
        img = _open(data, max_pixels)
        w, h = img.size
        if min(w, h) < min_side:
            raise ImageError(f"image is {w}x{h}, smaller than image.min_side={min_side}")
        try:
            scale = shorter_side / min(w, h) if shorter_side else (longer_side / max(w, h) if longer_side else 1.0)
            if img.format == "JPEG" and scale <= 0.5:
                img.draft(img.mode, (max(1, int(w * scale)), max(1, int(h * scale))))
            img.load()
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageError(f"corrupt or truncated image: {e}") from None
    before = img.size
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block should not lose the image
        pass
    turned = img.size != before and img.size == before[::-1]
    return np.asarray(_to_rgb8(img)), ((w, h) if turned else (h, w))


def decode_image(data: bytes, max_pixels: int = 100_000_000, min_side: int = 16) -> np.ndarray:
    """Encoded bytes -> HxWx3 uint8 RGB at full resolution (:func:`decode_sized`)."""
    return decode_sized(data, max_pixels, min_side)[0]


@dataclass(frozen=True)
class Geometry:
    """Where the model's crop lies in the original image."""
    height: int
    width: int
    resized_h: int
    resized_w: int
    top: int
    left: int
    crop: int


def geometry(height: int, width: int, resize: int, crop: int) -> Geometry:
    # torchvision's Resize(int): the shorter side becomes `resize`, the other keeps the aspect ratio.
    if height <= width:
        rh, rw = resize, int(resize * width / height)
    else:
        rh, rw = int(resize * height / width), resize
    top = int(round((rh - crop) / 2.0))
    left = int(round((rw - crop) / 2.0))
    return Geometry(height, width, rh, rw, top, left, crop)


def _source_span(lo: float, hi: float, scale: float, n: int) -> tuple[int, int]:
    """The source pixels [a, b) that a resampling of the source span [lo, hi) reads, at ``scale``
    source pixels per output pixel: the span plus the bilinear filter's support (one output pixel,
    ``max(scale, 1)`` source pixels) and a pixel for rounding, within [0, n)."""
    margin = int(np.ceil(max(scale, 1.0))) + 2
    return max(0, int(np.floor(lo)) - margin), min(n, int(np.ceil(hi)) + margin)


def resize_crop(rgb: np.ndarray, resize: int, crop: int, size: tuple[int, int] | None = None) -> np.ndarray:
    """HxWx3 uint8 -> crop x crop x 3 uint8: the centre crop of the image bilinearly resized (with
    antialiasing) to shorter side ``resize``. ``size``: the original (height, width) when ``rgb`` was
    decoded at a reduced scale; the geometry is the original's, so the crop covers the same region.

    Only the crop is resampled: the crop's window mapped back to ``rgb`` (plus the filter's support)
    is resized, not the whole image, so memory is the crop's whatever the image's shape (a 16-pixel
    high strip is not enlarged 16 times over its whole length). The pixels equal those of resizing
    the whole image then cropping (the same filter taps; within a grey level of rounding).
    """
    g = geometry(*(size or rgb.shape[:2]), resize, crop)
    h, w = rgb.shape[:2]
    sy, sx = h / g.resized_h, w / g.resized_w  # source pixels per resized pixel
    y0, y1, x0, x1 = g.top * sy, (g.top + crop) * sy, g.left * sx, (g.left + crop) * sx
    (a, b), (l, r) = _source_span(y0, y1, sy, h), _source_span(x0, x1, sx, w)
    part = Image.fromarray(np.ascontiguousarray(rgb[a:b, l:r]))
    return np.asarray(part.resize((crop, crop), Image.BILINEAR, box=(x0 - l, y0 - a, x1 - l, y1 - a)))


def resize_rgb(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """HxWx3 uint8 -> size (h, w) x 3 uint8, bilinear with antialiasing (a no-op at the same size)."""
    if rgb.shape[:2] == tuple(size):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((size[1], size[0]), Image.BILINEAR))


def normalize(batch_uint8: torch.Tensor) -> torch.Tensor:
    """[B, H, W, 3] uint8 -> [B, 3, H, W] float, ImageNet-normalised (on the batch's device)."""
    x = batch_uint8.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def to_original(anomaly_map: np.ndarray | torch.Tensor, g: Geometry, size: tuple[int, int] | None = None) -> np.ndarray:
    """Anomaly map on the crop (crop x crop) -> the original image's HxW (or ``size`` (h, w): the
    original image's extent sampled on a coarser grid, for huge originals).

    The crop's footprint in the original image is resampled bilinearly; pixels outside the crop
    (never seen by the model) take the nearest in-crop value.
    """
    m = torch.as_tensor(anomaly_map, dtype=torch.float32)[None, None]
    out_h, out_w = size or (g.height, g.width)
    sy, sx = g.height / g.resized_h, g.width / g.resized_w
    y0, x0 = g.top * sy, g.left * sx
    y1, x1 = (g.top + g.crop) * sy, (g.left + g.crop) * sx
    # Sample the crop map at every output pixel centre, in original coordinates (align_corners=False).
    ys = ((torch.arange(out_h, dtype=torch.float32) + 0.5) * (g.height / out_h) - y0) / (y1 - y0) * 2 - 1
    xs = ((torch.arange(out_w, dtype=torch.float32) + 0.5) * (g.width / out_w) - x0) / (x1 - x0) * 2 - 1
    gy, gx = torch.meshgrid(ys.clamp(-1, 1), xs.clamp(-1, 1), indexing="ij")
    grid = torch.stack([gx, gy], dim=-1)[None]
    out = F.grid_sample(m, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out[0, 0].numpy()
