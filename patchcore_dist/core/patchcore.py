"""PatchCore as a plain in-process object: embed, fit (coreset + memory bank), predict.

Pure torch/numpy/faiss: no Ray, no storage. The distributed jobs (:mod:`patchcore_dist.pipeline`)
wrap the same pieces.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..config import Config
from . import coreset as coreset_mod
from .backbones import WeightsReader, build_backbone, read_local
from .devices import fp32_arithmetic, pick_device
from .embedding import patch_features
from .inference import optimize_for_inference
from .index import set_search_params
from .memory_bank import MemoryBank
from .preprocessing import normalize
from .scoring import anomaly_maps, image_scores, patch_scores, reweighted_image_scores


@dataclass
class Prediction:
    image_scores: np.ndarray        # [B]
    patch_scores: np.ndarray        # [B, h, w]
    anomaly_maps: np.ndarray | None  # [B, crop, crop], when asked for


class Embedder:
    """Backbone + locally aware patch features for batches of preprocessed uint8 crops."""

    def __init__(self, config: Config, device: str | None = None, read_weights: WeightsReader = read_local):
        self.config = config
        self.device = pick_device(device or config.runtime.device)
        b = config.backbone
        backbone = build_backbone(b.name, b.layers, b.weights, read_weights)
        optimize = config.runtime.optimize_backbone
        self.backbone = (optimize_for_inference(backbone) if optimize else backbone).to(self.device)
        # NHWC activations: on CPUs too (2 cores, Lite0 at 224 px: 32 -> 24 ms per image for backbone
        # and patch features, the same features bit for bit)
        self.backbone = self.backbone.to(memory_format=torch.channels_last)
        prec = config.runtime.precision
        self._dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(prec)
        self._tf32 = prec == "tf32"

    def _arithmetic(self):
        """runtime.precision: fp32 is IEEE float32 also on GPUs (no TF32 convolutions); tf32 allows
        them; bf16/fp16 autocast the backbone. Patch features are computed in float32 either way."""
        if self._dtype is None:
            return fp32_arithmetic(conv=self._tf32, matmul=self._tf32)
        return torch.autocast(self.device.type, dtype=self._dtype)

    @torch.inference_mode()
    def __call__(self, crops_uint8: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """[B, crop, crop, 3] uint8 -> patch features [B*h*w, target_dim] (float32, on the device), grid."""
        x = torch.as_tensor(crops_uint8).to(self.device, non_blocking=True)
        x = normalize(x).contiguous(memory_format=torch.channels_last)
        with self._arithmetic():
            feats = self.backbone(x)
        e = self.config.embedding
        return patch_features([f.float() for f in feats], e.patch_size, e.pretrain_dim, e.target_dim)


class PatchCore:
    """The scorer: memory bank + nearest-neighbour search + maps; feature extraction via :class:`Embedder`."""

    def __init__(self, config: Config, bank: np.ndarray | None = None, embedder: Embedder | None = None,
                 device: str | None = None, index=None, read_weights: WeightsReader = read_local):
        self.config = config
        self._index = index
        self._embedder = embedder
        self._read_weights = read_weights
        self.device = embedder.device if embedder else pick_device(device or config.runtime.device)
        self.bank = self._bank(bank) if bank is not None else None

    @property
    def embedder(self) -> Embedder:
        """Built on first use: scoring pre-extracted features needs no backbone."""
        if self._embedder is None:
            self._embedder = Embedder(self.config, str(self.device), self._read_weights)
        return self._embedder

    def _bank(self, bank: np.ndarray) -> MemoryBank:
        if self._index is not None:
            set_search_params(self._index, self.config.index)  # this run's nprobe / ef_search
        return MemoryBank.from_config(bank, self.config, str(self.device), self._index)

    # -- fitting in one process (tests, benchmarks, small data) ------------------------------
    def embed(self, crops_uint8, batch_size: int | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
        bs = batch_size or self.config.runtime.batch_for(self.device.type)
        out, grid = [], None
        for s in range(0, len(crops_uint8), bs):
            f, grid = self.embedder(crops_uint8[s:s + bs])
            out.append(f.cpu())
        return torch.cat(out), grid

    def fit(self, crops_uint8) -> "PatchCore":
        feats, _ = self.embed(crops_uint8)
        self.bank = self._bank(select_memory_bank(feats, self.config))
        return self

    # -- prediction -----------------------------------------------------------------------
    @torch.inference_mode()
    def predict_features(self, feats: torch.Tensor, grid: tuple[int, int], num_images: int,
                         maps: bool = True) -> Prediction:
        if self.bank is None:
            raise RuntimeError("PatchCore has no memory bank: fit or load a model first")
        s = self.config.scoring
        scores, nearest = patch_scores(self.bank, feats, s.num_neighbors)
        if s.reweight:
            img = reweighted_image_scores(self.bank, feats, scores, nearest, num_images, s.reweight_neighbors)
        else:
            img, _ = image_scores(scores, num_images)
        grid_scores = scores.reshape(num_images, *grid)
        amap = None
        if maps:
            amap = anomaly_maps(scores.to(self.device), grid, self.config.image.crop, s.sigma).cpu().numpy()
        return Prediction(img.cpu().numpy(), grid_scores.cpu().numpy(), amap)

    def predict(self, crops_uint8, maps: bool = True) -> Prediction:
        feats, grid = self.embedder(crops_uint8)
        return self.predict_features(feats, grid, len(crops_uint8), maps)


def select_memory_bank(feats: torch.Tensor, config: Config) -> np.ndarray:
    """Coreset-reduce in-memory patch features [N, D] to the memory bank [K, D] (float32)."""
    c = config.coreset
    k = coreset_mod.coreset_size(len(feats), c.ratio, c.size)
    projected = coreset_mod.project(feats, coreset_mod.projection_matrix(feats.shape[1], c.projection_dim, config.seed))
    idx = coreset_mod.select(projected, k, config.seed, c.num_starting_points, c.device)
    return feats[idx].float().numpy()
