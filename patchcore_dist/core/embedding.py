"""Locally aware patch features (PatchCore section 3.1).

The original formulation, for levels l = 0..L-1 with feature maps [B, C_l, h_l, w_l]:

1. unfold every level into p x p neighbourhoods (stride 1, padding p // 2): [B, h_l*w_l, C_l, p, p];
2. bilinearly resample every patch component of the deeper levels onto the finest grid (h_0, w_0);
3. flatten each level's patch to C_l*p*p values and adaptive-average-pool it to ``pretrain_dim``;
4. stack the levels and adaptive-average-pool all L*pretrain_dim values to ``target_dim``.

Steps 1, 3 and 4 act on channels only and step 2 acts on space only; all are linear, so the
resampling commutes with the pooling, and steps 1, 3 and 4 of one level together are one fixed
linear map from its p x p neighbourhood to the output channels. That map is very sparse: every
output averages one final-pooling bin of one or two pretrain dims, each of which averages one bin of
consecutive neighbourhood values, so an output reads a short run of consecutive unfolded values
(2-3 for EfficientNet-Lite0's 40 and 112 channels, 9-18 for WRN50's 512 and 1024). :func:`patch_features`
therefore unfolds each level on its *own* grid, forms its output channels as a few "taps" (row
gathers of the unfolded tensor, weighted and summed: :func:`_taps`), and resamples only the level's
share of the output channels onto the finest grid, written channels-last into the final rows.
No unfolded tensor on the fine grid, no pretrain_dim intermediate, no final pooling pass: the
same numbers as the literal formulation (:func:`.reference.patch_features_reference`, the test
oracle) up to float rounding, at a fraction of its cost (benchmarks/README.md).
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from scipy import sparse


def _pool_matrix(c: int, dim: int) -> sparse.csr_matrix:
    """Adaptive average pooling from c to dim values as a sparse [dim, c] matrix: torch's bins
    [floor(i c / dim), ceil((i + 1) c / dim)), each value weighted 1 / bin size."""
    i = np.arange(dim)
    start, end = (i * c) // dim, ((i + 1) * c + dim - 1) // dim
    size = end - start
    rows = np.repeat(i, size)
    cols = np.repeat(start - np.cumsum(size) + size, size) + np.arange(size.sum())
    return sparse.csr_matrix((np.repeat(1.0 / size, size), (rows, cols)), shape=(dim, c))


@functools.lru_cache(maxsize=16)
def _taps(channels: tuple[int, ...], patch_size: int, pretrain_dim: int, target_dim: int,
          device: str = "cpu") -> tuple[tuple[int, int, torch.Tensor, torch.Tensor], ...]:
    """Per level: the output channels [a, b) it contributes to, and its composed pooling map
    (final pooling restricted to the level x the level's pooling) as taps: indices [T, b - a] into the
    level's unfolded values ((c, i, j) order) and weights [T, b - a, 1], zero where a row has fewer
    than T values. Built outside inference mode: they are cached and may meet tensors that need
    gradients later."""
    final = _pool_matrix(len(channels) * pretrain_dim, target_dim)
    out = []
    with torch.inference_mode(False):
        for level, c in enumerate(channels):
            m = (final[:, level * pretrain_dim:(level + 1) * pretrain_dim]
                 @ _pool_matrix(c * patch_size ** 2, pretrain_dim)).tocsr()
            m.sort_indices()
            counts = np.diff(m.indptr)
            rows = np.flatnonzero(counts)
            a, b = int(rows[0]), int(rows[-1]) + 1
            t = np.arange(counts.max())[:, None]
            present = t < counts[None, a:b]
            pos = m.indptr[a:b][None, :] + np.minimum(t, counts[None, a:b] - 1)
            idx = torch.from_numpy(m.indices[pos].astype(np.int64))
            wt = torch.from_numpy(np.where(present, m.data[pos], 0.0).astype(np.float32))
            out.append((a, b, idx.to(device), wt[:, :, None].to(device)))
    return tuple(out)


def patch_features(features: list[torch.Tensor], patch_size: int = 3, pretrain_dim: int = 1024,
                   target_dim: int = 1024) -> tuple[torch.Tensor, tuple[int, int]]:
    """Backbone feature maps -> patch features [B*h0*w0, target_dim] and the patch grid (h0, w0).

    Rows are ordered image by image, then row-major over the grid of the first (finest) level.
    """
    b = features[0].shape[0]
    h0, w0 = (int(s) for s in features[0].shape[-2:])
    taps = _taps(tuple(f.shape[1] for f in features), patch_size, pretrain_dim, target_dim,
                 str(features[0].device))
    out = torch.empty(b, h0, w0, target_dim, device=features[0].device)
    written = 0  # levels own consecutive channel ranges that overlap at most at their ends
    for fmap, (lo, hi, idx, wt) in zip(features, taps):
        h, w = fmap.shape[-2:]
        cols = F.unfold(fmap.float(), kernel_size=patch_size, padding=patch_size // 2)  # [B, C*p*p, h*w]
        y = cols.index_select(1, idx[0]).mul_(wt[0])
        for i in range(1, len(idx)):
            y = y.addcmul_(cols.index_select(1, idx[i]), wt[i])
        y = y.view(b, hi - lo, h, w)
        if (h, w) != (h0, w0):
            # channels-last: torch's vectorised CPU kernel (about 10x faster here); same numbers
            y = F.interpolate(y.contiguous(memory_format=torch.channels_last), size=(h0, w0),
                              mode="bilinear", align_corners=False)
        y = y.permute(0, 2, 3, 1)
        split = min(max(written, lo), hi)
        out[..., lo:split] += y[..., :split - lo]
        out[..., split:hi] = y[..., split - lo:]
        written = max(written, hi)
    return out.reshape(b * h0 * w0, target_dim), (h0, w0)
