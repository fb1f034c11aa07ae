"""Training-set denoising before the coreset (SoftPatch-style, docs/design.md#denoising).

A "good" folder may hold escapes: defective images nobody caught. Their defect patches, once in the
memory bank, make that kind of defect score as normal. Every training patch gets an outlier score
against the OTHER training images' patches at the same feature cell (or within ``radius`` cells of it,
for parts that are not aligned), on the coreset's projected features; the top ``fraction`` of all
patches never enters the coreset.

Scores are exact (every other image is compared), computed in chunks of cells and query images with a
bounded working set (``budget_bytes``), on the CPU or a GPU. Thresholds are taken by partition
(``np.argpartition``), never by ``torch.quantile`` (which refuses more than 2^24 elements).

- ``knn``: mean distance to the k nearest other-image patches, divided by the median of that value
  over the images at the same cell (cells differ in how much normal images vary there: background
  versus the object), so one global threshold fits every cell.
- ``lof``: the local outlier factor at the cell (radius 0): ~1 for an inlier, larger for an outlier.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

log = logging.getLogger(__name__)

BUDGET_BYTES = 256 * 2 ** 20  # distance blocks of one chunk (cells x query images x references)
EPS = 1e-12


def window(grid: tuple[int, int], radius: int) -> np.ndarray:
    """For every cell of the grid (row-major), the cells within ``radius`` (Chebyshev) of it: [l, m]
    int64 with -1 where the window leaves the grid; column 0 is the cell itself."""
    h, w = grid
    ys, xs = np.divmod(np.arange(h * w), w)
    offsets = [(0, 0)] + [(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)
                          if (dy, dx) != (0, 0)]
    out = np.full((h * w, len(offsets)), -1, np.int64)
    for j, (dy, dx) in enumerate(offsets):
        y, x = ys + dy, xs + dx
        ok = (y >= 0) & (y < h) & (x >= 0) & (x < w)
        out[ok, j] = (y * w + x)[ok]
    return out


def knn_per_cell(x: torch.Tensor, grid: tuple[int, int], k: int, radius: int = 0, device: str = "cpu",
                 budget_bytes: int = BUDGET_BYTES, references: np.ndarray | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """For each image's patch at each cell, its distances [n, l, k'] (ascending) to the k nearest OTHER
    images, each image at its best-matching patch within the cell's window (``radius`` cells), and
    those images' numbers [n, l, k']; k' = min(k, references - 1). ``x``: [n, l, p] float32;
    ``references``: the (sorted) image numbers compared with (None: every image).

    One batched GEMM per chunk of cells and query images (``budget_bytes`` bounds its distance block);
    window slots outside the grid get an infinite squared norm (so an infinite distance, no mask pass),
    the query's own image is set to infinity in place, the window is reduced by a minimum before the
    top-k over images."""
    n, l, p = x.shape
    refs = np.arange(n) if references is None else np.asarray(references, np.int64)
    r = len(refs)
    slot = np.full(n, -1, np.int64)
    slot[refs] = np.arange(r)                                  # an image's column among the references
    nbr = torch.from_numpy(window(grid, radius))
    m = nbr.shape[1]
    k_eff = max(1, min(k, r - 1))
    dev = torch.device(device)
    xs = x.to(dev, torch.float32)
    sq = (xs * xs).sum(-1)                                    # [n, l]
    xr, sqr = xs[torch.from_numpy(refs).to(dev)], sq[torch.from_numpy(refs).to(dev)]
    cells = max(1, min(l, budget_bytes // max(1, 4 * n * r * m)))
    queries = max(1, min(n, budget_bytes // max(1, 4 * cells * r * m)))
    out_d = torch.empty((n, l, k_eff), dtype=torch.float32)
    out_i = torch.empty((n, l, k_eff), dtype=torch.int64)
    for c0 in range(0, l, cells):
        idx = nbr[c0:c0 + cells].to(dev)                      # [c, m]
        c = len(idx)
        ref = xr[:, idx.clamp_min(0)].permute(1, 0, 2, 3).reshape(c, r * m, p)        # [c, r*m, p]
        ref_sq = sqr[:, idx.clamp_min(0)].masked_fill((idx < 0)[None], float("inf"))   # [r, c, m]
        ref_sq = ref_sq.permute(1, 0, 2).reshape(c, 1, r * m)
        for q0 in range(0, n, queries):
            b = min(queries, n - q0)
            q = xs[q0:q0 + b, c0:c0 + cells].permute(1, 0, 2)                       # [c, b, p]
            d2 = torch.baddbmm(ref_sq, q, ref.transpose(1, 2), alpha=-2.0)         # [c, b, r*m] less |q|^2
            d2 = d2.view(c, b, r, m).amin(-1)                                       # best slot per image
            own = slot[q0:q0 + b]
            rows = np.flatnonzero(own >= 0)
            d2[:, torch.from_numpy(rows).to(dev), torch.from_numpy(own[rows]).to(dev)] = float("inf")
            d2.add_(sq[q0:q0 + b, c0:c0 + cells].T[..., None])
            d, i = torch.topk(d2, k_eff, dim=-1, largest=False, sorted=True)
            out_d[q0:q0 + b, c0:c0 + cells] = d.clamp_min_(0).sqrt_().permute(1, 0, 2).cpu()
            out_i[q0:q0 + b, c0:c0 + cells] = torch.from_numpy(refs)[i.permute(1, 0, 2).cpu()]
    return out_d, out_i


def patch_outlier_scores(x: torch.Tensor, grid: tuple[int, int], k: int = 5, method: str = "knn",
                         radius: int = 4, device: str = "cpu", budget_bytes: int = BUDGET_BYTES,
                         max_references: int | None = None, seed: int = 0) -> np.ndarray:
    """Outlier score [n, l] float32 of every image's patch at every cell (higher: less like the other
    images there); ~1 for a typical patch under either method. Fewer than 2 images: zeros. Each image is
    compared with every other image, or with a seeded sample of ``max_references`` of them (the work
    then grows linearly with the images, not with their square)."""
    n, l, _ = x.shape
    if n < 2:
        return np.zeros((n, l), np.float32)
    if method == "lof" and radius:
        raise ValueError("denoise.method=lof compares patches at the same cell only (denoise.radius=0)")
    refs = None
    if max_references is not None and n > max_references + 1:
        refs = np.sort(np.random.default_rng(seed).choice(n, size=max(2, max_references), replace=False))
    d, i = knn_per_cell(x, grid, k, radius, device, budget_bytes, refs)
    if method == "knn":
        s = d.mean(-1)
        return (s / (s.median(0).values[None] + EPS)).numpy().astype(np.float32)
    if method != "lof":
        raise ValueError(f"unknown denoise method {method!r} (knn or lof)")
    return _lof(d, i).numpy().astype(np.float32)


def _lof(d: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
    """Local outlier factor per (image, cell) from the kNN at radius 0 (neighbours by image number)."""
    kdist = d[..., -1]                                        # [n, l]: each point's k-distance
    cell = torch.arange(d.shape[1])[None, :, None].expand_as(i)
    reach = torch.maximum(kdist[i, cell], d)                  # reach-dist(a, o) = max(k-dist(o), d(a, o))
    lrd = 1.0 / (reach.mean(-1) + EPS)
    return lrd[i, cell].mean(-1) / lrd


def drop_top(scores: np.ndarray, fraction: float) -> np.ndarray:
    """Boolean mask (shape of ``scores``) of the floor(fraction x size) highest scores, by partition."""
    flat = np.asarray(scores, np.float32).reshape(-1)
    n_drop = int(np.floor(fraction * flat.size))
    mask = np.zeros(flat.size, bool)
    if n_drop > 0:
        mask[np.argpartition(flat, flat.size - n_drop)[flat.size - n_drop:]] = True
    return mask.reshape(np.shape(scores))


def image_outliers(scores: np.ndarray, dropped: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per image [n]: its outlier score (its highest patch score) and the share of its patches dropped."""
    return scores.max(1).astype(np.float64), dropped.mean(1).astype(np.float64)
