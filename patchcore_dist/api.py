"""Scoring in a notebook or a service: a fitted model in this process, images in, decisions out.

    from patchcore_dist.api import Model
    model = Model.load("runs/bottle-model")          # a path or an s3:// URI, verified as `score` does
    p = model.predict("photo.png")                   # a path / URI, an HxWx3 uint8 array or a PIL image
    p.score, p.normalized_score, p.is_anomaly        # the score table's columns for this image
    p.anomaly_map                                     # float32 at the image's own size (the heatmap's values)

The same pieces as the score job (decoding, crop or tiles, backbone, memory bank, the image score,
the threshold, the anomaly map at the original resolution, peak-normalised as heatmaps are), so an
image scores here as it does in the score table. No Ray, nothing written.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from .artifacts import storage
from .artifacts.model import LoadedModel, load_model
from .config import Config, load_config
from .core import calibration
from .core.patchcore import PatchCore
from .core.preprocessing import decode_sized, resize_crop, resize_rgb
from .core.tiling import anomaly_map_of, cut_tiles, tiling_layout
from .errors import ImageError


@dataclass
class Prediction:
    """One image's result: what its score-table row says, and its anomaly map."""
    score: float                    # the image score s* (the table's `score`)
    normalized_score: float | None  # 0.5 at the threshold (None for models fitted without one)
    is_anomaly: bool | None         # score > threshold
    anomaly_map: np.ndarray         # [height, width] float32 on the original image; its maximum is the score
    patch_scores: np.ndarray        # the patch-score grid [h, w] (stitched over tiles with tiling on)


class Model:
    """A committed model, loaded and verified, with its backbone built on first use."""

    def __init__(self, loaded: LoadedModel, config: Config, storage_options: dict):
        self.loaded, self.config, self._opts = loaded, config, storage_options
        from .pipeline.stages import weights_reader, weights_sha256  # the jobs' reader: regular files within limits
        self._pc = PatchCore(config, loaded.bank, index=loaded.index,
                             read_weights=weights_reader(storage_options, weights_sha256(loaded.manifest)))

    @classmethod
    def load(cls, uri: str, overrides: list[str] | None = None, storage_options: dict | None = None) -> "Model":
        """The model at ``uri``; ``overrides`` (``key=value``) set this process's runtime / scoring keys as
        for ``score`` (e.g. ``runtime.device=cpu``); feature keys stay the model's."""
        from .pipeline.score import score_config  # the score job's rule for the run config (imports no Ray)
        user = load_config(None, overrides)
        opts = storage_options if storage_options is not None else user.storage.options()
        loaded = load_model(storage.absolute(uri), opts)
        return cls(loaded, score_config(loaded.config, user, None, list(overrides or [])), opts)

    @property
    def digest(self) -> str:
        return self.loaded.digest

    @property
    def threshold(self) -> float | None:
        """The decision threshold ``is_anomaly`` compares with (as in the score table)."""
        st = self.loaded.manifest["stats"]
        return st["threshold"] if st.get("threshold") is not None else st.get("heatmap_threshold")

    def predict(self, image) -> Prediction:
        """Score one image: a path or URI, encoded bytes, an HxWx3 uint8 array or a PIL image."""
        rgb, (height, width) = self._rgb(image)
        if self.config.tiling.enabled:
            score, grid = self._tiled(rgb, height, width)
        else:
            c = self.config.image
            pred = self._pc.predict(resize_crop(rgb, c.resize, c.crop, size=(height, width))[None], maps=False)
            score, grid = float(pred.image_scores[0]), pred.patch_scores[0]
        if not np.isfinite(score):  # the score job makes it an error row: never a decision
            raise ImageError(f"score is not finite ({score})")
        amap = anomaly_map_of(grid.ravel(), grid.shape, height, width, self.config)
        if "heatmap_threshold" in self.loaded.manifest["stats"]:  # as heatmaps are drawn
            amap = calibration.peak_normalised(amap, score)
        t = self.threshold
        norm = None if t is None else float(calibration.normalized_scores(
            score, t, self.loaded.manifest["stats"]["heatmap_min"]))
        return Prediction(score, norm, None if t is None else bool(score > t), amap.astype(np.float32), grid)

    def predict_many(self, images) -> list[Prediction]:
        return [self.predict(im) for im in images]

    def _tiled(self, rgb: np.ndarray, height: int, width: int) -> tuple[float, np.ndarray]:
        """The tiles of the working image scored (in the job's batches) and composed into one image row
        as the score job composes them (:class:`~.pipeline.tiles.TileAssembler`, which imports no Ray)."""
        from .pipeline.tiles import TileAssembler
        layout = tiling_layout(height, width, self.config)
        tiles = cut_tiles(resize_rgb(rgb, (layout.work_h, layout.work_w)), layout)
        bs = self.config.runtime.batch_for(self._pc.device.type)
        preds = [self._pc.predict(tiles[s:s + bs], maps=False) for s in range(0, len(tiles), bs)]
        scores = np.concatenate([p.image_scores for p in preds])
        grids = np.concatenate([p.patch_scores for p in preds])
        g = grids.shape[1]
        rows = [{"idx": 0, "tile": i, "tiles": len(tiles), "score": float(scores[i]), "error": "",
                 "patch_scores": grids[i].ravel(), "grid_h": g, "grid_w": g, "height": height, "width": width,
                 "unchanged": False} for i in range(len(tiles))]
        row = TileAssembler(self.config).assemble(rows)
        return float(row["score"]), np.asarray(row["patch_scores"], np.float32).reshape(row["grid_h"], row["grid_w"])

    def _rgb(self, image) -> tuple[np.ndarray, tuple[int, int]]:
        """Any accepted input as HxWx3 uint8 and the original (height, width): files decoded with the job's
        limits and reductions (a large JPEG at a reduced scale, as the decode stage does)."""
        c = self.config.image
        if isinstance(image, os.PathLike):
            image = os.fspath(image)
        if isinstance(image, (str, bytes)):
            data = image if isinstance(image, bytes) else \
                storage.read_bytes(storage.absolute(image), **self._opts, limit=c.max_bytes + 1)
            if len(data) > c.max_bytes:
                raise ImageError(f"file is over the limit image.max_bytes={c.max_bytes}")
            need = {"longer_side": self.config.tiling.working_size} if self.config.tiling.enabled else \
                {"shorter_side": 2 * c.resize}
            return decode_sized(data, c.max_pixels, c.min_side, **need)
        if hasattr(image, "convert"):  # a PIL image
            image = np.asarray(image.convert("RGB"))
        arr = np.asarray(image)
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
            raise ImageError(f"an image array must be HxWx3 (or HxW) uint8, got {arr.dtype} {arr.shape}")
        if min(arr.shape[:2]) < c.min_side or arr.shape[0] * arr.shape[1] > c.max_pixels:
            raise ImageError(f"image is {arr.shape[1]}x{arr.shape[0]}: outside image.min_side / image.max_pixels")
        return arr, arr.shape[:2]
