"""Locally aware patch features (PatchCore section 3.1).

The original formulation, for levels l = 0..L-1 with feature maps [B, C_l, h_l, w_l]:

1. unfold every level into p x p neighbourhoods (stride 1, padding p // 2): [B, h_l*w_l, C_l, p, p];
2. bilinearly resample every patch component of the deeper levels onto the finest grid (h_0, w_0);
3. flatten each level's patch to C_l*p*p values and adaptive-average-pool it to ``pretrain_dim``;
4. stack the levels and adaptive-average-pool all L*pretrain_dim values to ``target_dim``.

Steps 1, 3 and 4 act on channels only and step 2 acts on space only; all are linear, so the
resampling commutes with the pooling. :func:`patch_features` therefore pools each level on its
*own* grid first and resamples only ``pretrain_dim`` channels instead of C_l*p*p (9x fewer for a 3x3
neighbourhood), with no unfolded tensor on the fine grid. :func:`patch_features_reference` is the
literal formulation, kept as the test oracle and the benchmark baseline.

When every level is narrow (C_l*p*p <= pretrain_dim, e.g. EfficientNet-Lite0's 40 and 112 channels),
the pooling *enlarges* each neighbourhood vector, so unfolding and gathering is mostly memory traffic.
Steps 1, 3 and 4 of one level are then a single fixed linear map from the p x p neighbourhood to the
output channels, i.e. a p x p convolution whose weights are the composed pooling matrices
(:func:`_conv_weights`); one convolution per level writes the final rows directly (4x faster on two
CPU cores for Lite0, same numbers to float rounding). Wide levels (WRN50: 4608 values pooled to 1024)
keep the gather path, where a dense convolution would cost more than the backbone.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.lru_cache(maxsize=32)
def _bins(c: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Adaptive pooling's bins [start, end) for c -> dim, and the largest bin size."""
    i = torch.arange(dim)
    start = (i * c) // dim
    end = ((i + 1) * c + dim - 1) // dim
    return start, end - 1, int((end - start).max())


def _pool_rows(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Adaptive average pooling over axis 1 of [B, C, L] -> [B, dim, L], without a transposed copy.

    The same bins and the same arithmetic as adaptive_avg_pool1d; two cheap special cases:
    C a multiple of dim (a reshape and mean) and bins of at most two values (C < 2 dim: a gather).
    """
    c = x.shape[1]
    if c == dim:
        return x
    if c % dim == 0:
        return x.view(x.shape[0], dim, c // dim, x.shape[2]).mean(2)
    start, last, widest = _bins(c, dim)
    if widest <= 2:
        start, last = start.to(x.device), last.to(x.device)
        return (x.index_select(1, start) + x.index_select(1, last)) * 0.5
    return F.adaptive_avg_pool2d(x.unsqueeze(1), (dim, x.shape[2])).squeeze(1)


def _pool_matrix(c: int, dim: int) -> torch.Tensor:
    """adaptive_avg_pool1d from c to dim values as a [dim, c] matrix (the same bins, by construction)."""
    return F.adaptive_avg_pool1d(torch.eye(c, dtype=torch.float64)[:, None, :], dim)[:, 0, :].T


@functools.lru_cache(maxsize=16)
def _conv_weights(channels: tuple[int, ...], patch_size: int, pretrain_dim: int, target_dim: int,
                  device: str = "cpu") -> tuple[tuple[int, int, torch.Tensor], ...]:
    """Per level: the output channel range [a, b) it contributes to and its convolution weights
    [b - a, C_l, p, p] = (final pooling restricted to the level) x (the level's pooling), in (c, i, j) order.
    Built outside inference mode: they are cached and may later meet tensors that need gradients."""
    with torch.inference_mode(False):
        return _compose_conv_weights(channels, patch_size, pretrain_dim, target_dim, device)


def _compose_conv_weights(channels, patch_size, pretrain_dim, target_dim, device):
    final = _pool_matrix(len(channels) * pretrain_dim, target_dim)
    out = []
    for level, c in enumerate(channels):
        w = final[:, level * pretrain_dim:(level + 1) * pretrain_dim] @ _pool_matrix(c * patch_size ** 2, pretrain_dim)
        rows = torch.nonzero(w.abs().sum(1))[:, 0]
        a, b = int(rows.min()), int(rows.max()) + 1
        w = w[a:b].reshape(b - a, c, patch_size, patch_size).float()
        out.append((a, b, w.to(device).contiguous(memory_format=torch.channels_last)))
    return tuple(out)


def _patch_features_conv(features: list[torch.Tensor], patch_size: int, pretrain_dim: int,
                         target_dim: int) -> torch.Tensor:
    """[B*h0*w0, target_dim] as one convolution per level, written channels-last into the output."""
    b = features[0].shape[0]
    h0, w0 = features[0].shape[-2:]
    weights = _conv_weights(tuple(f.shape[1] for f in features), patch_size, pretrain_dim, target_dim,
                            str(features[0].device))
    out = torch.empty(b, h0, w0, target_dim, device=features[0].device)
    written = 0  # levels own consecutive channel ranges that overlap at most at their ends
    for fmap, (lo, hi, w) in zip(features, weights):
        fmap = fmap.float().contiguous(memory_format=torch.channels_last)
        y = F.conv2d(fmap, w, padding=patch_size // 2)
        if y.shape[-2:] != (h0, w0):
            y = F.interpolate(y, size=(h0, w0), mode="bilinear", align_corners=False)
        y = y.permute(0, 2, 3, 1)
        split = min(max(written, lo), hi)
        out[..., lo:split] += y[..., :split - lo]
        out[..., split:hi] = y[..., split - lo:]
        written = max(written, hi)
    return out.reshape(b * h0 * w0, target_dim)


def _level_features(fmap: torch.Tensor, patch_size: int, pretrain_dim: int) -> torch.Tensor:
    """[B, C, h, w] -> [B, pretrain_dim, h, w]: p x p neighbourhoods, pooled to pretrain_dim values."""
    b, c, h, w = fmap.shape
    cols = F.unfold(fmap, kernel_size=patch_size, padding=patch_size // 2)  # [B, C*p*p, h*w], (c, i, j) order
    return _pool_rows(cols, pretrain_dim).reshape(b, pretrain_dim, h, w)


def patch_features(features: list[torch.Tensor], patch_size: int = 3, pretrain_dim: int = 1024,
                   target_dim: int = 1024) -> tuple[torch.Tensor, tuple[int, int]]:
    """Backbone feature maps -> patch features [B*h0*w0, target_dim] and the patch grid (h0, w0).

    Rows are ordered image by image, then row-major over the grid of the first (finest) level.
    """
    h0, w0 = features[0].shape[-2:]
    if all(f.shape[1] * patch_size ** 2 <= pretrain_dim for f in features):
        return _patch_features_conv(features, patch_size, pretrain_dim, target_dim), (int(h0), int(w0))
    levels = []
    for i, fmap in enumerate(features):
        lvl = _level_features(fmap.float(), patch_size, pretrain_dim)
        if i > 0 and lvl.shape[-2:] != (h0, w0):
            # channels-last: torch's vectorised CPU kernel (about 10x faster here); same numbers
            lvl = F.interpolate(lvl.contiguous(memory_format=torch.channels_last), size=(h0, w0),
                                mode="bilinear", align_corners=False).contiguous()
        levels.append(lvl)
    b = features[0].shape[0]
    stacked = torch.cat(levels, dim=1).reshape(b, len(levels) * pretrain_dim, h0 * w0)  # level-major
    out = _pool_rows(stacked, target_dim)  # [B, target_dim, h0*w0]
    return out.transpose(1, 2).reshape(b * h0 * w0, target_dim), (int(h0), int(w0))


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
