"""GPU measurements (one H200 or any CUDA device): extraction, scoring, coreset, precision.

    bash benchmarks/gpu.sh            # installs what it needs, writes $OUT/gpu.json (or ./gpu.json)

WRN50 at 224 px with random weights for speed (FLOPs do not depend on the weights), the real
EfficientNet-Lite0 on the demo benchmark for the precision check. Each figure is printed beside
its baseline (fp32 / the literal original formulation) measured in the same run.
"""
from __future__ import annotations

import glob
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from patchcore_dist.core import coreset as cs  # noqa: E402
from patchcore_dist.core import reference  # noqa: E402
from patchcore_dist.config import load_config  # noqa: E402
from patchcore_dist.core.embedding import patch_features  # noqa: E402
from patchcore_dist.core.reference import patch_features_reference  # noqa: E402
from patchcore_dist.core.memory_bank import MemoryBank  # noqa: E402
from patchcore_dist.core.patchcore import Embedder, PatchCore  # noqa: E402

SMOKE = not torch.cuda.is_available()  # a tiny CPU run that checks the script itself
DEV = torch.device("cpu" if SMOKE else "cuda")
RESULTS: dict = {"device": "cpu (smoke)" if SMOKE else torch.cuda.get_device_name(0), "torch": torch.__version__}
BS = 4 if SMOKE else 256


def sync():
    if not SMOKE:
        torch.cuda.synchronize()


def timed(fn, iters: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    sync()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - t) / iters


def wrn_config(precision="fp32", search="fp32", bs=256):
    return load_config(None, ["backbone.name=wide_resnet50_2", "backbone.layers=[layer2, layer3]",
                              "backbone.weights=random", f"runtime.precision={precision}",
                              f"runtime.search_precision={search}", f"runtime.gpu_batch_size={bs}", f"runtime.device={DEV.type}"])


def bench_extraction(bs=BS):
    x = torch.randint(0, 256, (bs, 224, 224, 3), dtype=torch.uint8, device=DEV)
    out = {}
    for prec in ("fp32", "tf32", "bf16", "fp16"):
        emb = Embedder(wrn_config(prec, bs=bs))
        t = timed(lambda emb=emb: emb(x), 5)
        out[prec] = bs / t
        print(f"extraction WRN50 {prec}: {bs / t:,.0f} images/s (batch {bs})", flush=True)
    # Patch-feature step alone vs the literal formulation on the same backbone outputs.
    emb = Embedder(wrn_config("fp16", bs=64))
    nb = 4 if SMOKE else 64
    with torch.inference_mode():
        feats = [f.float() for f in emb.backbone(torch.randn(nb, 3, 224, 224, device=DEV))]
        fast = timed(lambda: patch_features(feats), 5)
        ref = timed(lambda: patch_features_reference(feats), 3)
        a, _ = patch_features(feats)
        b, _ = patch_features_reference(feats)
    out["patch_features_ms_per_64"] = {"ours": fast * 1e3, "original": ref * 1e3, "speedup": ref / fast,
                                       "max_abs_diff": float((a - b).abs().max())}
    print(f"patch features (64 images): ours {fast * 1e3:.1f} ms, original {ref * 1e3:.1f} ms, x{ref / fast:.1f}")
    RESULTS["extraction_images_per_s"] = out


def bench_scoring(bs=BS):
    x = torch.randint(0, 256, (bs, 224, 224, 3), dtype=torch.uint8, device=DEV)
    emb = Embedder(wrn_config("fp16", bs=bs))
    feats, grid = emb(x)
    out = {}
    for m in ((512,) if SMOKE else (16_384, 163_840)):
        idx = torch.randint(0, len(feats), (m,), device=DEV)
        bank = (feats[idx] + 0.05 * torch.randn(m, feats.shape[1], device=DEV)).cpu().numpy()
        row = {}
        for search in ("fp32", "tf32"):
            pc = PatchCore(wrn_config("fp16", search, bs), bank, embedder=emb)
            t_search = timed(lambda pc=pc: pc.predict_features(feats, grid, bs, maps=False), 3)
            t_e2e = timed(lambda pc=pc: pc.predict(x, maps=False), 3)
            row[search] = {"search_only_images_per_s": bs / t_search, "images_per_s": bs / t_e2e}
            print(f"scoring bank {m}: search {search}: {bs / t_e2e:,.0f} images/s end to end from tensors, "
                  f"search alone {bs / t_search:,.0f} images/s", flush=True)
        # Precision of the fast searches against fp32 on these features.
        ref = MemoryBank(bank, DEV.type, "fp32").search(feats[:50000])[0][:, 0]
        d = MemoryBank(bank, DEV.type, "tf32").search(feats[:50000])[0][:, 0]
        row["tf32"]["max_abs_err_over_median"] = float((d - ref).abs().max() / ref.median())
        out[str(m)] = row
    RESULTS["scoring"] = out


def bench_coreset(n=20_000 if SMOKE else 1_000_000, d=1024, ratio=0.01):
    g = torch.Generator(device=DEV).manual_seed(0)
    x = torch.randn(n, d, device=DEV, generator=g, dtype=torch.float16 if not SMOKE else torch.float32)
    matrix = cs.projection_matrix(d, 128, 0).to(DEV)
    sync()
    t = time.perf_counter()
    proj = torch.cat([x[s:s + 262144].float() @ matrix for s in range(0, n, 262144)])
    sync()
    t_proj = time.perf_counter() - t
    k = int(n * ratio)
    t = time.perf_counter()
    sel = cs.greedy_coreset(proj, k, 0, device=DEV)
    t_sel = time.perf_counter() - t
    # The original loop on a slice, extrapolated per step.
    steps = 200
    t = time.perf_counter()
    cs_ref = reference.greedy_coreset_reference(proj, steps)
    sync()
    t_ref_step = (time.perf_counter() - t) / steps
    same = set(sel[:steps].tolist()) == set(cs_ref.tolist())  # the CUDA-graph run vs the original loop
    RESULTS["coreset_1M_1pct"] = {"projection_s": t_proj, "selection_s": t_sel, "selected": len(sel),
                                  "ours_ms_per_step": t_sel / k * 1e3, "original_ms_per_step": t_ref_step * 1e3,
                                  "speedup": t_ref_step / (t_sel / k), "same_first_200": same,
                                  "peak_gb": 0 if SMOKE else torch.cuda.max_memory_allocated() / 1e9}
    print(f"coreset {n} x {d} -> {k}: projection {t_proj:.2f} s, selection {t_sel:.2f} s "
          f"({t_sel / k * 1e3:.3f} ms/step vs original {t_ref_step * 1e3:.3f} ms/step), same: {same}", flush=True)


def bench_precision(data="benchmarks/data"):
    """Real EfficientNet-Lite0 on the demo benchmark: IEEE fp32 against tf32/fp16/bf16 backbones and tf32 search."""
    from PIL import Image
    from scipy.stats import spearmanr
    from sklearn.metrics import roc_auc_score
    from patchcore_dist.core.preprocessing import resize_crop
    out = {}
    for cat in sorted(os.listdir(data)):
        root = os.path.join(data, cat)
        load = lambda p: resize_crop(np.asarray(Image.open(p).convert("RGB")), 256, 224)  # noqa: E731
        train = np.stack([load(p) for p in sorted(glob.glob(f"{root}/train/good/*.png"))])
        tests = sorted(glob.glob(f"{root}/test/*/*.png"))
        labels = np.array([0 if "/good/" in p else 1 for p in tests])
        test = np.stack([load(p) for p in tests])
        row = {}
        ref_scores = None
        bank = PatchCore(load_config(None, [f"runtime.device={DEV.type}"])).fit(train).bank.bank  # IEEE fp32
        for prec, search in (("fp32", "fp32"), ("fp32", "tf32"), ("tf32", "fp32"), ("fp16", "fp32"),
                             ("fp16", "tf32"), ("bf16", "fp32"), ("bf16", "tf32")):
            cfg = load_config(None, [f"runtime.precision={prec}", f"runtime.search_precision={search}",
                                     f"runtime.device={DEV.type}"])
            s = PatchCore(cfg, bank).predict(test, maps=False).image_scores
            ref_scores = s if ref_scores is None else ref_scores
            row[f"{prec}/{search}"] = {"image_auroc": round(float(roc_auc_score(labels, s)), 4),
                                       "spearman_vs_fp32": float(spearmanr(s, ref_scores)[0]),
                                       "max_rel_err": float(np.abs(s - ref_scores).max() / np.median(ref_scores))}
        out[cat] = row
        print(cat, json.dumps(row), flush=True)
    RESULTS["precision"] = out


def bench_files(data="benchmarks/data", bs=BS, workers=12):
    """End to end from PNG files: DataLoader workers decode while the GPU scores (bank 16k, fp16)."""
    from PIL import Image
    from patchcore_dist.core.preprocessing import resize_crop
    files = sorted(glob.glob(f"{data}/*/*/*/*.png")) * 40
    files = files[: 16 if SMOKE else 4096]

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(files)

        def __getitem__(self, i):
            return torch.from_numpy(resize_crop(np.asarray(Image.open(files[i]).convert("RGB")), 256, 224).copy())

    emb = Embedder(wrn_config("fp16", "tf32", bs))
    bank = torch.randn(16384, 1024).numpy()
    pc = PatchCore(wrn_config("fp16", "tf32", bs), bank, embedder=emb)
    dl = torch.utils.data.DataLoader(DS(), batch_size=bs, num_workers=0 if SMOKE else workers, pin_memory=not SMOKE,
                                     prefetch_factor=None if SMOKE else 4)
    t = time.perf_counter()
    n = 0
    for batch in dl:
        pc.predict(batch, maps=False)
        n += len(batch)
    sync()
    dt = time.perf_counter() - t
    RESULTS["files_end_to_end"] = {"images": n, "images_per_s": n / dt, "decode_workers": workers}
    print(f"end to end from PNG files ({workers} decode workers): {n / dt:,.0f} images/s", flush=True)


if __name__ == "__main__":
    torch.backends.cudnn.benchmark = True
    steps = sys.argv[1:] or ["extraction", "scoring", "coreset", "precision", "files"]
    for step in steps:
        try:
            globals()[f"bench_{step}"]()
        except Exception as e:  # keep the other measurements
            RESULTS[f"{step}_error"] = repr(e)
            print(f"{step} failed: {e!r}", flush=True)
        if not SMOKE:
            torch.cuda.empty_cache()
    out = os.path.join(os.environ.get("OUT", "."), "gpu.json")
    with open(out, "w") as f:
        json.dump(RESULTS, f, indent=2)
    print(json.dumps(RESULTS, indent=2))
