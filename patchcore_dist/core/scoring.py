"""Patch scores, image score and anomaly map (PatchCore section 3.3)."""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from .memory_bank import MemoryBank


def patch_scores(bank: MemoryBank, features: torch.Tensor, num_neighbors: int = 1):
    """Patch score = Euclidean distance to the nearest memory-bank feature (mean over k when k > 1).

    Returns (scores [N], nearest bank index [N]).
    """
    d, idx = bank.search(features, num_neighbors)
    return d.mean(1), idx[:, 0]


def image_scores(scores: torch.Tensor, num_images: int) -> tuple[torch.Tensor, torch.Tensor]:
    """s* per image: the maximum patch score, and the position of that patch within the image."""
    s = scores.reshape(num_images, -1)
    best, pos = s.max(1)
    return best, pos


def reweighted_image_scores(bank: MemoryBank, features: torch.Tensor, scores: torch.Tensor,
                            nearest: torch.Tensor, num_images: int, num_neighbors: int = 3) -> torch.Tensor:
    """The paper's re-weighting: s = (1 - exp||m_test* - m*|| / sum_{m in N_b(m*)} exp||m_test* - m||) s*.

    N_b(m*) are the b nearest memory-bank features of m* (m* itself included); the weight is one
    minus the softmax weight of m* among them, so an m* in a sparse region of the bank counts more.
    """
    s_star, pos = image_scores(scores, num_images)
    per_image = features.shape[0] // num_images
    rows = torch.arange(num_images, device=pos.device) * per_image + pos
    m_test = features[rows.to(features.device)].float()
    m_star_idx = nearest[rows.to(nearest.device)].cpu().numpy()
    m_star = torch.from_numpy(bank.bank[m_star_idx])
    _, support = bank.search(m_star, num_neighbors)  # [B, b], m* first
    support_feats = torch.from_numpy(bank.bank[support.cpu().numpy()])  # [B, b, D]
    d = torch.linalg.norm(m_test.cpu()[:, None, :] - support_feats, dim=-1)  # [B, b]
    weight = 1.0 - torch.softmax(d, dim=1)[:, 0]
    return weight.to(s_star.device) * s_star


def _symmetric_indices(n: int, pad: int) -> np.ndarray:
    """Indices for scipy.ndimage's 'reflect' boundary (d c b a | a b c d | d c b a)."""
    i = np.arange(-pad, n + pad) % (2 * n)
    return np.where(i >= n, 2 * n - 1 - i, i)


def gaussian_kernel(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).float()


@functools.lru_cache(maxsize=16)
def _blur_matrix(n: int, sigma: float) -> torch.Tensor:
    """[n, n] float32: the 1-D Gaussian filter with scipy's 'reflect' boundary as a matrix (row i holds
    the weights of output i), so that a separable blur is two matrix products."""
    k = gaussian_kernel(sigma).double().numpy()
    r = (len(k) - 1) // 2
    src = _symmetric_indices(n, r)  # padded position -> source index
    m = np.zeros((n, n))
    rows = np.repeat(np.arange(n), len(k))
    cols = src[np.arange(n)[:, None] + np.arange(len(k))[None, :]].ravel()
    np.add.at(m, (rows, cols), np.tile(k, n))
    return torch.from_numpy(m.astype(np.float32))


def gaussian_blur(maps: torch.Tensor, sigma: float = 4.0) -> torch.Tensor:
    """Separable Gaussian smoothing of [B, H, W], equal to scipy.ndimage.gaussian_filter(sigma, mode='reflect').

    As two matrix products with the banded filter matrices (:func:`_blur_matrix`): about 15x faster on
    the CPU than a 1-channel convolution with the 33-tap kernel, which oneDNN runs poorly (it was most
    of the render stage's time; benchmarks/score_job.py)."""
    if sigma <= 0:
        return maps
    b, h, w = maps.shape
    mh = _blur_matrix(h, float(sigma)).to(maps.device)
    mw = _blur_matrix(w, float(sigma)).to(maps.device)
    return torch.matmul(torch.matmul(mh, maps.float()), mw.T)


def anomaly_maps(scores: torch.Tensor, grid: tuple[int, int], size: int, sigma: float = 4.0) -> torch.Tensor:
    """Patch scores [B*h*w] -> anomaly maps [B, size, size]: bilinear upsampling, then Gaussian smoothing."""
    h, w = grid
    m = scores.reshape(-1, 1, h, w).float()
    m = F.interpolate(m, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    return gaussian_blur(m, sigma)


def anomaly_map_original(scores: torch.Tensor, grid: tuple[int, int], geom, sigma: float = 4.0,
                         size: tuple[int, int] | None = None) -> np.ndarray:
    """One image's patch scores [h*w] -> its anomaly map on the original image (``geom``: a
    preprocessing.Geometry): smoothed at model resolution, then mapped back through resize and crop
    (sampled at ``size`` (h, w) instead of the original's pixels when given)."""
    from .preprocessing import to_original
    return to_original(anomaly_maps(scores, grid, geom.crop, sigma)[0].numpy(), geom, size)

