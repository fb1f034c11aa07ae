"""The score job end to end, heatmaps and overlays on, vs the in-process original formulation with maps.

    python benchmarks/score_job.py [--small 48] [--large 144] [--repeat 5] [--executor ray|local]

A model fitted on the demo's brick training images; the archive mixes the test images of brick,
coffee and gravel (most patches of two of them far from the bank), cycled to --small and --large
images. Measures
  (a) the original formulation in one process: decode + resize/crop, the unmodified backbone, literal
      patch features (unfold, resample, pool), faiss flat, the anomaly map (bilinear upsampling,
      scipy's Gaussian), coloured in float with matplotlib's colour map, a PNG at Pillow's defaults;
  (b) our score job (the default config; on a local Ray instance, or in process with --executor
      local) on both archive sizes: the marginal rate is (large - small) / (t_large - t_small), which
      leaves out start-up and the first batch;
  (c) the render stage (render_batch: anomaly map at the original size, colours, PNG, overlay JPEG),
      run in process on one core on the job's own rows: its time per image against the job's marginal
      CPU time per image (wall time per image x the cores, all busy), and per component, ours vs the
      previous render (float colouring and blending, PNG level 6).
Prints the ratios.
"""
import argparse
import glob
import json
import os
import shutil
import tempfile
import time

import faiss
import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from common import BASELINE_NOTE, demo_data

from patchcore_dist.config import load_config
from patchcore_dist.core.backbones import build_backbone
from patchcore_dist.core.preprocessing import geometry, normalize, resize_crop, decode_sized, resize_rgb
from patchcore_dist.core.reference import patch_features_reference
from patchcore_dist.core.scoring import anomaly_map_original
from patchcore_dist.core.calibration import peak_normalised
from patchcore_dist.pipeline.cluster import init_ray
from patchcore_dist.pipeline.fit import run_fit
from patchcore_dist.pipeline.score import run_score
from patchcore_dist.pipeline.stages import Score, decode_batch, render_batch
from patchcore_dist.render import heatmap as hm


def archive(root: str, n: int) -> str:
    """n images cycled from the brick, coffee and gravel test sets (interleaved), as PNG files."""
    src = [sorted(glob.glob(os.path.join(demo_data(), c, "test/*/*.png"))) for c in ("brick", "coffee", "gravel")]
    mixed = [p for group in zip(*src) for p in group]
    out = os.path.join(root, f"archive{n}")
    os.makedirs(out)
    for i in range(n):
        shutil.copy(mixed[i % len(mixed)], os.path.join(out, f"{i:05d}.png"))
    return out


def original(files, plain, bank: np.ndarray, out: str, cfg) -> None:
    """The original formulation with maps, one image batch of 8 at a time, PNGs written."""
    from matplotlib import colormaps
    flat = faiss.IndexFlatL2(bank.shape[1])
    flat.add(bank)
    cmap = colormaps["jet"]
    for s in range(0, len(files), 8):
        x = np.stack([resize_crop(np.asarray(Image.open(p).convert("RGB")), cfg.image.resize, cfg.image.crop)
                      for p in files[s:s + 8]])
        with torch.inference_mode():
            f, grid = patch_features_reference(plain(normalize(torch.as_tensor(x))), 3, 1024, 1024)
        d2, _ = flat.search(f.numpy(), 1)
        m = torch.from_numpy(np.sqrt(d2[:, 0]).reshape(len(x), 1, *grid))
        up = torch.nn.functional.interpolate(m, size=x.shape[1:3], mode="bilinear", align_corners=False)
        for j, a in enumerate(up[:, 0].numpy()):
            a = ndimage.gaussian_filter(a, sigma=4)
            rgb = (cmap((a - a.min()) / (a.max() - a.min() + 1e-12))[..., :3] * 255).astype(np.uint8)
            Image.fromarray(rgb).save(os.path.join(out, f"{s + j:05d}.png"))


def job(model: str, images: str, out: str, executor: str = "ray") -> float:
    t = time.perf_counter()
    run_score(model, images, out, overrides=["output.heatmaps=true", "output.overlay=true",
                                             f"runtime.executor={executor}"])
    return time.perf_counter() - t


def scored_rows(model: str, images: str, cfg_dict: dict) -> dict:
    """The job's decode and score stages in process on one batch: the rows the render stage gets."""
    uris = sorted(glob.glob(os.path.join(images, "*.png")))[:8]
    batch = {"uri": np.array(uris, object), "rel": np.array([os.path.basename(u) for u in uris], object)}
    batch = decode_batch(batch, cfg_dict, keep_bytes=True)
    return Score(model, cfg_dict)(batch)


def render_components(rows: dict, cfg, vrange, repeat: int) -> dict:
    """ms per image of each render component at the rows' original sizes, ours and the previous render."""
    from common import side_by_side
    i = 0
    h, w = int(rows["grid_h"][i]), int(rows["grid_w"][i])
    grid = torch.from_numpy(np.array(rows["patch_scores"][i][: h * w], np.float32))
    size = (int(rows["height"][i]), int(rows["width"][i]))
    g = geometry(*size, cfg.image.resize, cfg.image.crop)
    amap = peak_normalised(anomaly_map_original(grid, (h, w), g, cfg.scoring.sigma, size), float(rows["score"][i]))
    level = hm.heat_index(amap, vrange)
    rgb = hm.colorize(amap, vrange, level)
    orig = resize_rgb(decode_sized(bytes(rows["data"][i]))[0], size)
    fns = {
        "anomaly map at original size": lambda: anomaly_map_original(grid, (h, w), g, cfg.scoring.sigma, size),
        "decode original": lambda: decode_sized(bytes(rows["data"][i])),
        "colour (ours: uint8 level + table)": lambda: hm.colorize(amap, vrange),
        "colour (previous: float)": lambda: hm.color_table()[np.rint(hm.heat_level(amap, vrange) * 255).astype(np.int32)],
        "PNG (ours: level 1)": lambda: hm.encode(rgb, **hm.PNG_OPTIONS),
        "PNG (previous: level 6)": lambda: hm.encode(rgb),
        "overlay blend (ours: uint8)": lambda: hm.overlay(orig, rgb, amap, vrange, level),
        "overlay blend (previous: float)": lambda: (orig * (1 - (np.float32(0.1) + np.float32(0.6) * hm.heat_level(
            amap, vrange))[..., None]) + rgb * (np.float32(0.1) + np.float32(0.6) * hm.heat_level(amap, vrange))[..., None]
            ).astype(np.uint8),
        "overlay JPEG": lambda: hm.encode(orig, "JPEG", quality=90),
    }
    reps = [lambda f=f: [f() for _ in range(10)] for f in fns.values()]
    t = side_by_side(dict(zip(fns, reps)), repeat)
    sizes = {"PNG bytes ours": len(hm.encode(rgb, **hm.PNG_OPTIONS)), "PNG bytes previous": len(hm.encode(rgb))}
    return {**{k: round(v * 100, 3) for k, v in t.items()}, **sizes}  # ms per call (10 calls per round)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--small", type=int, default=48)
    p.add_argument("--large", type=int, default=144)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--executor", default="ray", choices=["ray", "local"],
                   help="runtime.executor of our jobs: a local Ray instance, or in process")
    a = p.parse_args()
    tmp = tempfile.mkdtemp()
    cfg = load_config()
    if a.executor == "ray":
        init_ray(cfg)  # once: the marginal rate leaves Ray's start-up out anyway
    model = os.path.join(tmp, "model")
    run_fit(os.path.join(demo_data(), "brick"), model, cfg)
    small, large = archive(tmp, a.small), archive(tmp, a.large)
    from patchcore_dist.artifacts.model import load_model
    loaded = load_model(model)
    bank = np.asarray(loaded.bank, np.float32)
    torch.set_num_threads(2)
    faiss.omp_set_num_threads(2)
    plain = build_backbone(cfg.backbone.name, cfg.backbone.layers, cfg.backbone.weights)
    files = sorted(glob.glob(os.path.join(large, "*.png")))
    rounds = {"job small": [], "job large": [], "original": []}
    job(model, small, os.path.join(tmp, "out-warm-up"), a.executor)  # the first job's one-time costs (imports, caches)
    for r in range(a.repeat):  # alternately, so that the machine's drift hits both alike
        for name, imgs in (("job small", small), ("job large", large)):
            rounds[name].append(job(model, imgs, os.path.join(tmp, f"out-{name[-5:]}-{r}"), a.executor))
        out = os.path.join(tmp, f"orig-{r}")
        os.makedirs(out)
        t = time.perf_counter()
        original(files, plain, bank, out, cfg)
        rounds["original"].append(time.perf_counter() - t)
    marginal = [(a.large - a.small) / (tl - ts) for ts, tl in zip(rounds["job small"], rounds["job large"])]
    orig_rate = [a.large / t for t in rounds["original"]]
    ratios = [m / o for m, o in zip(marginal, orig_rate)]
    vrange = tuple(json.loads(json.dumps(_vrange(model, cfg))))
    rows = scored_rows(model, large, cfg.to_dict())
    res = render_share(rows, cfg, vrange, np.median(marginal), tmp, a.repeat)
    res.update({"images": [a.small, a.large], "job s": rounds["job small"] + rounds["job large"],
                "marginal images/s": round(float(np.median(marginal)), 2),
                "original images/s": round(float(np.median(orig_rate)), 2),
                "marginal / original": round(float(np.median(ratios)), 3)})
    res["components ms per image (one image at its original size)"] = render_components(rows, cfg, vrange, a.repeat)
    print(BASELINE_NOTE)
    print(f"score job marginal rate {res['marginal images/s']} images/s vs original with maps "
          f"{res['original images/s']} images/s: x{res['marginal / original']} (per round {np.round(ratios, 2)})")
    print(f"render stage {res['render ms/image']} ms/image on one core = {100 * res['render share']:.1f} % of the "
          f"job's marginal CPU time ({res['marginal ms/image']} ms/image x {res['cores']} cores; "
          f"{100 * res['render share of wall']:.1f} % of its wall time per image)")
    print(json.dumps(res, indent=1))
    shutil.rmtree(tmp)


def _vrange(model: str, cfg) -> tuple[float, float]:
    from patchcore_dist.artifacts.model import load_model
    from patchcore_dist.pipeline.score import _heatmap_range
    return _heatmap_range(load_model(model), cfg)


def render_share(rows: dict, cfg, vrange, marginal_rate: float, tmp: str, repeat: int) -> dict:
    """The render stage (render_batch, as the job runs it) on the job's rows, ms per image, and its
    share of the job's marginal time per image."""
    cfg_dict = cfg.to_dict()
    n = len(rows["uri"])
    times = []
    for r in range(repeat + 1):
        t = time.perf_counter()
        render_batch(rows, cfg_dict, os.path.join(tmp, f"heat-{r}"), vrange)
        times.append(time.perf_counter() - t)
    ms = 1e3 * float(np.median(times[1:])) / n
    marginal_ms = 1e3 / marginal_rate
    cores = os.cpu_count() or 1  # the job keeps every core busy; render_batch here runs on one
    return {"render ms/image": round(ms, 2), "marginal ms/image": round(marginal_ms, 2), "cores": cores,
            "render share": round(ms / (marginal_ms * cores), 3), "render share of wall": round(ms / marginal_ms, 3)}


if __name__ == "__main__":
    main()
