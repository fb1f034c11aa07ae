"""The literal original formulations: test oracles and benchmark baselines, never used by the jobs.

Each is written as the original PatchCore code computes it (unfold, resample and pool; the
concatenate-and-minimum greedy loop; brute-force distances), so the fast paths in
:mod:`.embedding`, :mod:`.coreset` and :mod:`.memory_bank` can be checked against them.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def patch_features_reference(features: list[torch.Tensor], patch_size: int = 3, pretrain_dim: int = 1024,
                             target_dim: int = 1024) -> tuple[torch.Tensor, tuple[int, int]]:
    """The literal original formulation (unfold -> resample every patch component -> pool)."""
    p = patch_size
    patches, shapes = [], []
    for fmap in features:
        b, c, h, w = fmap.shape
        cols = F.unfold(fmap.float(), kernel_size=p, padding=p // 2, stride=1)
        patches.append(cols.reshape(b, c, p, p, h * w).permute(0, 4, 1, 2, 3))  # [B, h*w, C, p, p]
        shapes.append((h, w))
    ref_h, ref_w = shapes[0]
    for i in range(1, len(patches)):
        x = patches[i]
        b, _, c = x.shape[:3]
        h, w = shapes[i]
        x = x.reshape(b, h, w, c, p, p).permute(0, 3, 4, 5, 1, 2).reshape(-1, h, w)
        x = F.interpolate(x.unsqueeze(1), size=(ref_h, ref_w), mode="bilinear", align_corners=False).squeeze(1)
        x = x.reshape(b, c, p, p, ref_h, ref_w).permute(0, 4, 5, 1, 2, 3).reshape(b, ref_h * ref_w, c, p, p)
        patches[i] = x
    flat = [x.reshape(-1, *x.shape[-3:]) for x in patches]  # [B*h0*w0, C, p, p]
    pooled = [F.adaptive_avg_pool1d(x.reshape(len(x), 1, -1), pretrain_dim).squeeze(1) for x in flat]
    stacked = torch.stack(pooled, dim=1)  # [N, L, pretrain_dim]
    out = F.adaptive_avg_pool1d(stacked.reshape(len(stacked), 1, -1), target_dim).reshape(len(stacked), -1)
    return out, (ref_h, ref_w)


def greedy_coreset_reference(projected: torch.Tensor, k: int, seed: int = 0, num_starting_points: int = 10):
    """The original loop (concatenate the distances, take the minimum, every step). Benchmark baseline."""
    x = projected.float()
    n = len(x)
    rng = np.random.default_rng(seed)
    starts = rng.choice(n, size=min(num_starting_points, n), replace=False)

    def cdist(a, b):
        aa = (a * a).sum(1, keepdim=True)
        bb = (b * b).sum(1, keepdim=True).T
        return (-2 * a @ b.T + aa + bb).clamp(0, None).sqrt()

    anchor = cdist(x, x[starts]).mean(-1).reshape(-1, 1)
    chosen = []
    for _ in range(k):
        idx = int(torch.argmax(anchor).item())
        chosen.append(idx)
        dist = cdist(x, x[idx:idx + 1])
        anchor = torch.cat([anchor, dist], dim=-1)
        anchor = torch.min(anchor, dim=1).values.reshape(-1, 1)
    return torch.tensor(chosen, dtype=torch.long)


def search_reference(queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """Nearest distances by brute force in float32 torch (benchmark baseline and test oracle)."""
    return torch.cdist(queries.float(), bank.float()).min(1).values
