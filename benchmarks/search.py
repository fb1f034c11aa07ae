"""Exact nearest-neighbour search on the CPU: brute force vs pruned vs auto (adaptive), in float32 and with
the bfloat16 candidates (runtime.search_precision), per batch mix.

    python benchmarks/search.py [--bank 3000] [--threads 2] [--repeat 5]

A memory bank from one category's training images (brick, the coreset cut to --bank rows); queries are
the patch features of batches of 8 images as a scoring actor sees them: in-distribution (brick test
images), far from the bank (gravel and coffee: another product, or a defect-heavy line), mixed within
each batch (4 brick + 4 far images) and alternating batches (a brick batch, a far batch, ...). Prints
ms per image for each mode, run alternately (medians of --repeat rounds), the ratios against brute
force (median of per-round ratios), the share of queries the pruned search had to search in full, how
many blocks auto pruned / brute-forced, and checks that every mode returns brute force's neighbours.
Modes: brute, pruned, auto (float32: search_precision=fp32), and brute-bf16, auto-bf16 (bfloat16
candidates; auto-bf16 is the default on a CPU with native bfloat16 dot products).
"""
import argparse
import json
import time

import faiss
import numpy as np
import torch
from threadpoolctl import threadpool_limits

from common import crops, image_files, side_by_side

from patchcore_dist.config import load_config
from patchcore_dist.core.memory_bank import MemoryBank
from patchcore_dist.core.patchcore import PatchCore, select_memory_bank


def batches(feats: torch.Tensor, per_image: int, size: int = 8) -> list[np.ndarray]:
    n = len(feats) // per_image
    return [feats[s * per_image:min(n, s + size) * per_image].numpy() for s in range(0, n, size)]


def same_neighbours(got, truth) -> bool:
    """Brute force's neighbours up to float32 ties: the distances equal within rounding (a measured
    candidate and faiss' GEMM round differently), the indices equal but for such ties."""
    (d, i), (d0, i0) = got, truth
    return bool(torch.allclose(d, d0, rtol=1e-4, atol=1e-3) and (i == i0).float().mean() > 0.999)


def search_mode(bank: np.ndarray, cfg, exact_search: str, precision: str = "fp32") -> MemoryBank:
    """The memory bank searched with index.exact_search and runtime.search_precision set."""
    return MemoryBank.from_config(bank, cfg.model_copy(update={
        "index": cfg.index.model_copy(update={"exact_search": exact_search}),
        "runtime": cfg.runtime.model_copy(update={"search_precision": precision})}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bank", type=int, default=3000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="cpu: process CPU time (steadier than wall time when other processes load the machine)")
    a = p.parse_args()
    clock = time.process_time if a.clock == "cpu" else time.perf_counter
    torch.set_num_threads(a.threads)
    faiss.omp_set_num_threads(a.threads)
    threadpool_limits(a.threads)  # numpy's BLAS (the bound's projection), as the scoring actors set it
    cfg = load_config(overrides=[f"coreset.size={a.bank}"])
    pc = PatchCore(cfg)
    train, grid = pc.embed(crops(image_files("brick/train/good/*.png")))
    bank = select_memory_bank(train, cfg)
    per_image = grid[0] * grid[1]
    sets = {name: pc.embed(crops(image_files(pattern)))[0] for name, pattern in
            (("in-distribution", "brick/test/*/*.png"), ("far", "[gc][ro]*/test/*/*.png"))}
    far_batches, near_batches = batches(sets["far"], per_image), batches(sets["in-distribution"], per_image)
    halves = zip(batches(sets["in-distribution"], per_image, 4), batches(sets["far"], per_image, 4))
    mixes = {"in-distribution": near_batches, "far from the bank": far_batches,
             "mixed in a batch": [np.concatenate(pair) for pair in halves],
             "alternating": [b for pair in zip(near_batches, far_batches) for b in pair]}
    modes = {name: search_mode(bank, cfg, *name.split("-")) for name in
             ("brute", "pruned", "auto", "brute-bf16", "auto-bf16")}
    results = {"bank": len(bank), "threads": a.threads, "clock": a.clock}
    for mix, qs in mixes.items():
        images = sum(len(q) for q in qs) / per_image
        truth = [modes["brute"].search(q, 1) for q in qs]
        for m, mb in modes.items():
            assert all(same_neighbours(mb.search(q, 1), t) for q, t in zip(qs, truth)), m
            mb.unproven = 0
        auto = modes["auto"]._pruned
        auto.pruned_blocks = auto.brute_blocks = 0  # auto in float32 (auto-bf16 prunes from 4,800 rows)
        t = side_by_side({m: (lambda mb=mb, qs=qs: [mb.search(q, 1) for q in qs]) for m, mb in modes.items()}, a.repeat, clock)
        rounds = a.repeat + 1
        row = {m: round(1e3 * t[m] / images, 2) for m in modes}
        row.update({f"{m}/brute": round(t.ratio(m, "brute"), 3) for m in modes if m != "brute"})
        row["searched in full (pruned)"] = round(modes["pruned"].unproven / (rounds * images * per_image), 3)
        row["auto blocks pruned / brute"] = f"{auto.pruned_blocks}/{auto.brute_blocks}"
        results[mix] = row
        others = "  ".join(f"{m} {row[m]:6.2f} (x{row[m + '/brute']:.3f})" for m in modes if m != "brute")
        print(f"{mix:18s} ms/image  brute {row['brute']:6.2f}  {others}  "
              f"searched in full by pruned: {100 * row['searched in full (pruned)']:.1f}%  "
              f"auto blocks pruned/brute {row['auto blocks pruned / brute']}", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
