"""Start-up, as whole processes: `patchcore fit` over 40 images and `patchcore score` over 8 images
(embedded default config: offline EfficientNet-Lite0, local files, runtime.executor=auto), against the
original formulation fitting the same 40 images in one process (unmodified backbone, unfold-based
patch features, the original greedy coreset loop, faiss flat). Each command is a fresh Python process,
run in turn with its baseline (A B A B ...); medians and the per-pair ratio are printed.

    python benchmarks/startup.py [--repeat 3] [--executor auto] [extra k=v overrides for ours]

``--baseline-fit DIR MODEL`` (used by the script itself) is the original formulation's fit.
"""
import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def baseline_fit(train: str, model: str) -> None:
    """The original formulation in one process: decode, unmodified backbone, unfold patch features,
    the original greedy coreset over JL-projected features, a faiss flat index written to ``model``."""
    import faiss
    import torch

    sys.path.insert(0, ROOT)
    from patchcore_dist.config import load_config
    from patchcore_dist.core.backbones import build_backbone
    from patchcore_dist.core.coreset import coreset_size, projection_matrix
    from patchcore_dist.core.preprocessing import normalize
    from patchcore_dist.core.reference import greedy_coreset_reference, patch_features_reference
    from common import crops
    cfg = load_config()
    e, c = cfg.embedding, cfg.coreset
    backbone = build_backbone(cfg.backbone.name, cfg.backbone.layers, cfg.backbone.weights)
    x = normalize(torch.from_numpy(crops(sorted(glob.glob(os.path.join(train, "*.png"))), cfg.image.crop)))
    with torch.inference_mode():
        feats = torch.cat([patch_features_reference(backbone(x[s:s + 8]), e.patch_size, e.pretrain_dim,
                                                    e.target_dim)[0] for s in range(0, len(x), 8)])
        proj = feats @ projection_matrix(e.target_dim, c.projection_dim, cfg.seed)
        chosen = greedy_coreset_reference(proj, coreset_size(len(feats), c.ratio), cfg.seed, c.num_starting_points)
    index = faiss.IndexFlatL2(feats.shape[1])
    index.add(feats[chosen].numpy().astype(np.float32))
    os.makedirs(model, exist_ok=True)
    faiss.write_index(index, os.path.join(model, "index.faiss"))


def images(work: str) -> tuple[str, str]:
    """40 training images and 8 test images of the demo benchmark (built once), copied to ``work``."""
    sys.path.insert(0, HERE)
    from common import image_files
    train, test = os.path.join(work, "train"), os.path.join(work, "score")
    for folder, files in ((train, image_files("*/train/good/*.png")[:40]), (test, image_files("*/test/*/*.png")[:8])):
        os.makedirs(folder)
        for i, f in enumerate(files):
            shutil.copy(f, os.path.join(folder, f"{i:03d}.png"))
    return train, test


def timed(cmd: list[str]) -> float:
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return time.perf_counter() - t


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--executor", default="auto")
    p.add_argument("--baseline-fit", nargs=2, metavar=("TRAIN", "MODEL"))
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    if a.baseline_fit:
        return baseline_fit(*a.baseline_fit)
    py = sys.executable
    work = tempfile.mkdtemp(prefix="startup-")
    train, test = images(work)
    over = [f"runtime.executor={a.executor}"] + a.overrides
    ours_fit = lambda i: [py, "-m", "patchcore_dist.cli", "fit", "--train", train, "--model", f"{work}/m{i}", *over]
    base_fit = lambda i: [py, os.path.join(HERE, "startup.py"), "--baseline-fit", train, f"{work}/b{i}"]
    score = lambda i: [py, "-m", "patchcore_dist.cli", "score", "--model", f"{work}/m0", "--images", test,
                       "--output", f"{work}/o{i}", *over]
    times = {"fit_ours": [], "fit_original": [], "score_ours": []}
    for i in range(a.repeat + 1):  # round 0: warm-up (file caches), not counted
        t = (timed(ours_fit(i)), timed(base_fit(i)), timed(score(i)))
        if i:
            for k, v in zip(times, t):
                times[k].append(v)
    med = {k: float(np.median(v)) for k, v in times.items()}
    ratio = float(np.median(np.array(times["fit_ours"]) / np.array(times["fit_original"])))
    from common import BASELINE_NOTE
    print(BASELINE_NOTE)
    print(f"fit 40 images: ours {med['fit_ours']:.1f} s, original in process {med['fit_original']:.1f} s, "
          f"ours / original x{ratio:.2f} (median of {a.repeat} pairs); score 8 images: ours {med['score_ours']:.1f} s "
          f"(executor={a.executor}; every figure a whole process)")
    print({k: [round(x, 2) for x in v] for k, v in times.items()})
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
