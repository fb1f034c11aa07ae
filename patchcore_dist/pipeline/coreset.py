"""The fit's memory bank from its feature shards, on the driver and on Ray tasks.

The shards are streamed and projected on the fly (only the N x projection_dim matrix is held), the
greedy coreset runs on the driver (``single``) or in two rounds (``two_round``: one Ray task per
part, then the driver over the union), and only the selected full-dimension rows are read back.
Before it, every training patch gets an outlier score against the other images' patches at its
feature cell (:mod:`patchcore_dist.core.denoise`); with ``denoise.enabled`` the most outlying never
enter the coreset. The per-image scores make ``train_outliers.parquet``.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from ..artifacts.features import gather_rows, project_shards
from ..config import Config
from ..core import calibration
from ..core import coreset as greedy
from ..core import denoise
from ..core.devices import pick_device
from ..core.memory_bank import MemoryBank

log = logging.getLogger(__name__)


def build_memory_bank(shard_uris: list[str], counts: list[int], config: Config, opts: dict
                      ) -> tuple[np.ndarray, dict, np.ndarray, list, dict | None, MemoryBank]:
    """Shards -> coreset (streamed, projected) -> full-dimension memory bank + training patch-score
    statistics; also the selected global patch indices (bank row i is patch ``selected[i]``), the
    shard layout (uri, images, patches per image) that maps them back to images, and the training
    images' outlier scores (:func:`outlier_scores`; None with tiling), and the MemoryBank that scored
    the sample (its pruned search serves the calibration: built once)."""
    selected, layout, info, outliers = select_coreset(shard_uris, counts, config, opts)
    n = info["patches"]
    # A sample of training patches, scored against the bank, fixes the model's score scale (the kept
    # patches only, when denoising left some out).
    rng = np.random.default_rng(config.seed)
    if outliers is not None and outliers["keep"] is not None:
        kept = np.flatnonzero(outliers["keep"])
        sample = kept[rng.choice(len(kept), size=min(len(kept), calibration.SCALE_SAMPLE), replace=False)]
    else:
        sample = rng.choice(n, size=min(n, calibration.SCALE_SAMPLE), replace=False)
    bank, sample_feats = gather_rows(selected, layout, opts, extra=sample)
    memory = MemoryBank.from_config(bank, config)
    d, _ = memory.search(sample_feats, 1)
    q = calibration.patch_score_quantiles(d[:, 0].numpy())
    stats = {"patches": int(n), "coreset": {k: v for k, v in info.items() if k != "patches"}, "train_patch_score": q}
    log.info("coreset (%s) done in %.1f s: %d of %d patches; training patch scores p50 %.4g p99 %.4g",
             info["method"], info["coreset_seconds"], len(selected), n, q["p50"], q["p99"])
    return bank, stats, selected, layout, outliers, memory


def outlier_scores(projected: torch.Tensor, layout: list, config: Config) -> dict:
    """Every training patch's outlier score at its feature cell (:func:`denoise.patch_outlier_scores`
    over the projected rows, images in layout order) and, with ``denoise.enabled``, the patches kept:
    {"image_score" [images], "dropped_fraction" [images], "keep" [N] bool or None, "seconds"}."""
    t0 = time.time()
    dn = config.denoise
    per = layout[0][2]
    side = int(round(per ** 0.5))
    grid = (side, side) if side * side == per else (1, per)
    x = projected.view(-1, per, projected.shape[1])
    scores = denoise.patch_outlier_scores(x, grid, dn.neighbors, dn.method, dn.radius,
                                          str(pick_device(config.coreset.device)),
                                          max_references=dn.max_references, seed=config.seed)
    dropped = denoise.drop_top(scores, dn.fraction) if dn.enabled else np.zeros(scores.shape, bool)
    image_score, share = denoise.image_outliers(scores, dropped)
    out = {"image_score": image_score, "dropped_fraction": share,
           "keep": ~dropped.reshape(-1) if dropped.any() else None, "seconds": round(time.time() - t0, 3)}
    log.info("training outliers (%s, k=%d, radius %d) of %d images x %d cells in %.1f s%s", dn.method, dn.neighbors,
             dn.radius, len(x), per, out["seconds"],
             f"; denoising leaves {int(dropped.sum())} of {dropped.size} patches out of the coreset" if dn.enabled
             else " (denoise.enabled=false: every patch may enter the coreset)")
    return out


def select_coreset(shard_uris: list[str], counts: list[int], config: Config, opts: dict
                   ) -> tuple[np.ndarray, list, dict, dict | None]:
    """Global indices of the memory bank's patches, the shard layout, timing facts and the training
    outliers (with ``denoise.enabled``, the patches they leave out are never selected)."""
    c = config.coreset
    t0 = time.time()
    matrix = greedy.projection_matrix(config.embedding.target_dim, c.projection_dim, config.seed)
    n = int(sum(counts))
    projected, layout, outliers, pending = None, None, None, None
    if not config.tiling.enabled:
        projected, layout = project_shards(shard_uris, matrix, opts)
        if config.denoise.enabled:  # the coreset needs the patches it keeps
            outliers = outlier_scores(projected, layout, config)
        else:  # only train_outliers.parquet needs them: computed beside the coreset
            pending = _beside(outlier_scores, projected, layout, config)
            outliers = {"keep": None}
    elif config.denoise.enabled:
        log.warning("denoise.enabled is ignored with tiling (a tile's cells are not aligned from image to image): "
                    "every patch may enter the coreset; train_outliers.parquet holds no scores")
    keep = outliers["keep"] if outliers else None
    n_kept = n if keep is None else int(keep.sum())
    k = greedy.coreset_size(n_kept, c.ratio, c.size)
    method = c.method if c.method != "auto" else ("two_round" if n >= c.two_round_min_patches else "single")
    if k >= n_kept:
        method = "all"
    info = {"patches": n, "method": method, "k": k}
    if method == "two_round":
        del projected
        selected, layout = _two_rounds(shard_uris, counts, matrix, k, config, opts, info, keep)
    else:
        if projected is None:
            projected, layout = project_shards(shard_uris, matrix, opts)
        log.info("coreset: %d patches projected to %d dims in %.1f s; selecting %d (%.2f%%)", n,
                 projected.shape[1], time.time() - t0, k, 100.0 * k / n)
        rows = None if keep is None else np.flatnonzero(keep)
        pool = projected if rows is None else projected[torch.from_numpy(rows)]
        selected = greedy.select(pool, k, config.seed, c.num_starting_points, c.device).numpy()
        selected = selected if rows is None else rows[selected]
        del projected, pool
    if pending is not None:
        outliers = pending.result()
    if outliers:
        info.update(denoise_seconds=outliers["seconds"], denoised=n - n_kept)
    info["coreset_seconds"] = round(time.time() - t0, 3)
    return selected, layout, info, outliers


def _beside(fn, *args) -> Future:
    """``fn(*args)`` on a thread of its own, beside the caller's work (its result from ``.result()``).

    The training-outlier scores with denoise off (the default) decide nothing in the model, so they
    run while the greedy coreset does: the pruned traversal holds one core (one BLAS thread, many
    small numpy calls), the outlier GEMMs (torch, the GIL released) take the other. Both only read
    the projected rows. They were ~13 s of a quiet 200-image fit on 2 cores; the whole-process gain
    is still to be measured on a quiet machine (benchmarks/README.md, docs/design.md)."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="train-outliers")
    try:
        return pool.submit(fn, *args)
    finally:
        pool.shutdown(wait=False)


def _first_round_task(shard_uris: list[str], matrix, k_part: int, seed: int, num_starting_points: int,
                      device: str, opts: dict, keep: np.ndarray | None = None):
    """One Ray task per part: project its shards, greedy k-center over them (over the patches ``keep``
    marks, when denoising left some out; the local indices count every patch of the part)."""
    proj, layout = project_shards(shard_uris, None if matrix is None else torch.from_numpy(matrix), opts)
    if keep is None:
        local, rows = greedy.first_round(proj, k_part, seed, num_starting_points, device)
        return local, rows, layout
    kept = np.flatnonzero(keep)
    local, rows = greedy.first_round(proj[torch.from_numpy(kept)], k_part, seed, num_starting_points, device)
    return kept[local], rows, layout


def _two_rounds(shard_uris: list[str], counts: list[int], matrix, k: int, config: Config, opts: dict,
                info: dict, keep: np.ndarray | None = None) -> tuple[np.ndarray, list]:
    """The first round as Ray tasks over groups of shards (part j seeded with seed + j), the second
    on the driver; the same composition as :func:`patchcore_dist.core.coreset.two_round_coreset`."""
    import ray
    c = config.coreset
    t0 = time.time()
    parts = min(len(shard_uris), c.parts or max(1, int(ray.cluster_resources().get("CPU", 1))))
    groups = [list(g) for g in np.array_split(np.arange(len(shard_uris)), parts) if len(g)]
    gpu = c.device != "cpu" and ray.cluster_resources().get("GPU", 0) > 0
    task = ray.remote(num_cpus=1, num_gpus=1 if gpu else 0)(_first_round_task)
    mat = None if matrix is None else matrix.numpy()
    n = int(sum(counts))
    starts = np.cumsum([0] + list(counts))
    refs = [task.remote([shard_uris[i] for i in g], mat,
                        greedy.part_size(k, int(sum(counts[i] for i in g)), n, c.oversample),
                        config.seed + j, c.num_starting_points, c.device, opts,
                        None if keep is None else keep[starts[g[0]]:starts[g[-1] + 1]])
            for j, g in enumerate(groups)]
    log.info("coreset (two rounds): %d patches in %d parts on Ray, keeping %.1fx their share of k=%d",
             n, len(groups), c.oversample, k)
    layout, results = [], []
    for local, rows, part_layout in ray.get(refs):
        layout.extend(part_layout)
        results.append((local, rows, sum(ni * l for _, ni, l in part_layout)))
    t1 = time.time()
    selected = greedy.second_round(results, k, config.seed, c.num_starting_points, c.device).numpy()
    info.update(parts=len(groups), union=int(sum(len(r[0]) for r in results)), first_round_s=round(t1 - t0, 3),
                second_round_s=round(time.time() - t1, 3))
    return selected, layout
