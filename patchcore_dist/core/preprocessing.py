"""Image decoding and preprocessing as the original PatchCore: resize the shorter side, centre crop,
ImageNet normalisation. Also the inverse geometry, to put an anomaly map back on the original image.
"""
from __future__ import annotations

import io
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


def _to_rgb8(img: Image.Image) -> Image.Image:
    """Any PIL mode (1, L, P, RGBA, LA, CMYK, I;16, I, F, ...) -> 8-bit RGB."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16"):
            arr = arr / 257.0  # full 16-bit range -> 8 bits
        else:
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB") if img.mode != "RGB" else img


def decode_image(data: bytes, max_pixels: int = 100_000_000, min_side: int = 16) -> np.ndarray:
    """Encoded bytes -> HxWx3 uint8 RGB with EXIF orientation applied; ImageError with a reason otherwise."""
    if len(data) == 0:
        raise ImageError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise ImageError(f"image has {w}x{h} = {w * h} pixels, over the limit image.max_pixels={max_pixels}")
            img.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"image refused as a decompression bomb: {e}") from None
    except Image.UnidentifiedImageError:
        raise ImageError("not a recognised image format") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"corrupt or truncated image: {e}") from None
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block should not lose the image
        pass
    if min(img.size) < min_side:
        raise ImageError(f"image is {img.size[0]}x{img.size[1]}, smaller than image.min_side={min_side}")
    return np.asarray(_to_rgb8(img))


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


def resize_crop(rgb: np.ndarray, resize: int, crop: int) -> np.ndarray:
    """HxWx3 uint8 -> crop x crop x 3 uint8 (bilinear resize with antialiasing, then centre crop)."""
    g = geometry(rgb.shape[0], rgb.shape[1], resize, crop)
    img = Image.fromarray(rgb).resize((g.resized_w, g.resized_h), Image.BILINEAR)
    return np.asarray(img)[g.top:g.top + crop, g.left:g.left + crop]


def normalize(batch_uint8: torch.Tensor) -> torch.Tensor:
    """[B, H, W, 3] uint8 -> [B, 3, H, W] float, ImageNet-normalised (on the batch's device)."""
    x = batch_uint8.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def to_original(anomaly_map: np.ndarray | torch.Tensor, g: Geometry) -> np.ndarray:
    """Anomaly map on the crop (crop x crop) -> the original image's HxW.

    The crop's footprint in the original image is resampled bilinearly; pixels outside the crop
    (never seen by the model) take the nearest in-crop value.
    """
    m = torch.as_tensor(anomaly_map, dtype=torch.float32)[None, None]
    sy, sx = g.height / g.resized_h, g.width / g.resized_w
    y0, x0 = g.top * sy, g.left * sx
    y1, x1 = (g.top + g.crop) * sy, (g.left + g.crop) * sx
    # Sample the crop map at every original pixel centre (align_corners=False convention).
    ys = (torch.arange(g.height, dtype=torch.float32) + 0.5 - y0) / (y1 - y0) * 2 - 1
    xs = (torch.arange(g.width, dtype=torch.float32) + 0.5 - x0) / (x1 - x0) * 2 - 1
    gy, gx = torch.meshgrid(ys.clamp(-1, 1), xs.clamp(-1, 1), indexing="ij")
    grid = torch.stack([gx, gy], dim=-1)[None]
    out = F.grid_sample(m, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out[0, 0].numpy()
