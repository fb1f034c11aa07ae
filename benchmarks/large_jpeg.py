"""Large camera JPEGs: full decoding vs reduced-resolution (DCT-scaled, Pillow's ``draft``) decoding.

    python benchmarks/large_jpeg.py [--images 16] [--repeat 3]

Photographs of 12 MP (4000 x 3000) and 24 MP (6000 x 4000), JPEG quality 90, each a mosaic of
native-resolution crops of scikit-image's real photographs (textures and objects, 1.5x upscaled, with
sensor-like noise so that the fine detail a DCT-scaled decode drops is there). Measures, side by side:
decode images/s as the decode stage runs it (decode_sized with shorter_side = 2 * image.resize, then
the exact resize + crop) with and without the draft; the image scores of a model fitted on the demo's
brick category computed from both decodes (Spearman rank correlation, largest score change); and that
the render stage still writes heatmaps and overlays at the original size (up to
render.heatmap.MAX_RENDER_PIXELS, above which both are capped by design).
"""
import argparse
import io
import json
import os
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from scipy.stats import spearmanr

from common import crops, image_files

from patchcore_dist.config import load_config
from patchcore_dist.core.patchcore import PatchCore
from patchcore_dist.core.preprocessing import decode_sized, resize_crop
from patchcore_dist.render.heatmap import render_size
from patchcore_dist.synthetic.photos import _photo

PHOTOS = ("brick", "gravel", "grass", "coffee", "chelsea", "astronaut", "rocket", "coins", "camera")


def photograph(rng, height: int, width: int) -> bytes:
    """One large JPEG (quality 90): a mosaic of 1.5x-upscaled crops of real photographs plus noise."""
    canvas = np.zeros((height, width, 3), np.uint8)
    tile = 600
    for y in range(0, height, tile):
        for x in range(0, width, tile):
            img = _photo(PHOTOS[rng.integers(len(PHOTOS))])
            s = min(min(img.shape[:2]), tile * 2 // 3)
            oy, ox = rng.integers(0, img.shape[0] - s + 1), rng.integers(0, img.shape[1] - s + 1)
            part = Image.fromarray(img[oy:oy + s, ox:ox + s]).resize((tile, tile), Image.BICUBIC)
            h, w = min(tile, height - y), min(tile, width - x)
            canvas[y:y + h, x:x + w] = np.asarray(part)[:h, :w]
    noisy = canvas + rng.normal(0, 3, canvas.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def model_input(data: bytes, cfg, draft: bool) -> np.ndarray:
    """The decode stage's crop: decode (drafted when asked, as the stage does by default), exact resize, crop."""
    rgb, size = decode_sized(data, cfg.image.max_pixels, cfg.image.min_side,
                             2 * cfg.image.resize if draft else None)
    return resize_crop(rgb, cfg.image.resize, cfg.image.crop, size=size)


def render_sizes(data: bytes, cfg, pc, tmp: str) -> dict:
    """The render stage on a drafted decode: the heatmap's and the overlay's sizes against the original's."""
    from patchcore_dist.pipeline.stages import Score, decode_batch, render_batch
    os.makedirs(tmp)
    path = os.path.join(tmp, "big.jpg")
    with open(path, "wb") as f:
        f.write(data)
    model = os.path.join(tmp, "model")
    _write_model(pc, cfg, model)
    batch = decode_batch({"uri": np.array([path], object), "rel": np.array(["big.jpg"], object)},
                         cfg.to_dict(), keep_bytes=True)
    rows = render_batch(Score(model, cfg.to_dict())(batch), cfg.to_dict(), os.path.join(tmp, "heat"), (0.0, 1.0))
    heat = Image.open(rows["heatmap"][0]).size
    over = Image.open(os.path.join(tmp, "heat", "big.jpg_overlay.jpg")).size
    h, w = int(batch["height"][0]), int(batch["width"][0])
    return {"original": [w, h], "expected (render_size)": list(render_size(h, w))[::-1], "heatmap": list(heat),
            "overlay": list(over)}


def _write_model(pc, cfg, uri: str) -> None:
    from patchcore_dist.artifacts.model import ModelWriter, config_yaml, npy_bytes
    from patchcore_dist.core.index import build_index, serialize_index
    bank = np.ascontiguousarray(pc.bank.bank)
    w = ModelWriter(uri)
    w.put("memory_bank.npy", npy_bytes(bank))
    w.put("index.faiss", serialize_index(build_index(bank, cfg.index, cfg.seed)))
    w.put("config.yaml", config_yaml(cfg))
    w.commit(cfg, bank.shape, {}, {"heatmap_min": 0.0, "heatmap_max": 1.0})


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(2)
    cfg = load_config()
    rng = np.random.default_rng(0)
    sizes = [(3000, 4000) if i % 2 == 0 else (4000, 6000) for i in range(a.images)]
    files = [photograph(rng, h, w) for h, w in sizes]
    print(f"{len(files)} JPEGs, {np.mean([len(f) for f in files]) / 1e6:.1f} MB on average, "
          f"{sum(h * w == 12e6 for h, w in sizes)} at 12 MP, {sum(h * w == 24e6 for h, w in sizes)} at 24 MP", flush=True)
    times = {"full": [], "draft": []}
    inputs = {}
    for _ in range(a.repeat):  # alternately
        for mode in ("full", "draft"):
            t = time.perf_counter()
            inputs[mode] = np.stack([model_input(f, cfg, mode == "draft") for f in files])
            times[mode].append(time.perf_counter() - t)
    rate = {m: len(files) / float(np.median(v)) for m, v in times.items()}
    pc = PatchCore(cfg).fit(crops(image_files("brick/train/good/*.png")))
    scores = {m: pc.predict(x, maps=False).image_scores for m, x in inputs.items()}
    rho = float(spearmanr(scores["full"], scores["draft"])[0])
    change = float(np.max(np.abs(scores["full"] - scores["draft"]) / np.abs(scores["full"])))
    pixel = float(np.abs(inputs["full"].astype(np.int16) - inputs["draft"]).mean())
    print(f"decode: full {rate['full']:.2f} images/s, draft {rate['draft']:.2f}; Spearman {rho:.5f}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        rendered = {f"{h * w // 10**6} MP": render_sizes(files[i], cfg, pc, os.path.join(tmp, str(i)))
                    for i, (h, w) in list(enumerate(sizes))[:2]}
    res = {"decode images/s full": round(rate["full"], 2), "decode images/s draft": round(rate["draft"], 2),
           "draft / full": round(rate["draft"] / rate["full"], 2), "spearman": round(rho, 5),
           "largest relative score change": round(change, 4), "mean |crop difference| (grey levels)": round(pixel, 2),
           "rendered sizes (w, h)": rendered}
    print(f"decode (as the decode stage, to the model's crop): full {rate['full']:.2f} images/s, draft "
          f"{rate['draft']:.2f} images/s: x{res['draft / full']}; image scores draft vs full: Spearman {rho:.5f}, "
          f"largest change {100 * change:.2f} %")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
