"""Ray Data stages: decode (tasks), extract / score (actor pools holding the backbone), render (tasks).

Every stage passes a row through for every input row; a failure on one image sets that row's
``error`` and never fails the block. Patch features never leave the actor that computed them:
fit's extractor writes them to Parquet shards itself, the scorer returns only scores.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import time
import uuid

import numpy as np

from ..artifacts import storage
from ..config import Config
from ..core.calibration import peak_normalised
from ..core.preprocessing import decode_sized, resize_crop, resize_rgb
from ..errors import BackboneError, ImageError
from ..render.heatmap import PNG_OPTIONS, colorize, encode, heat_index, overlay, render_size
from . import faults as _faults
from .cluster import node_id

log = logging.getLogger(__name__)


def _err(e: Exception) -> str:
    msg = str(e) or type(e).__name__
    return msg if isinstance(e, (ImageError, FileNotFoundError)) else f"{type(e).__name__}: {msg}"


def _read_image(uri: str, known: str | None, cfg: Config, opts: dict, known_digests: set, need: dict,
                within: str | None = None) -> dict:
    """One image file: its bytes, digest and whether it is unchanged (then not decoded), else the decoded
    pixels (reduced in decoding as ``need`` allows, :func:`decode_sized`) and the original size.
    ``within``: the folder it was listed under (a local file read only if it still lies there)."""
    data = storage.read_bytes(str(uri), **opts, limit=cfg.image.max_bytes + 1, within=within)
    if len(data) > cfg.image.max_bytes:  # grew since it was listed
        raise ImageError(f"file is over the limit image.max_bytes={cfg.image.max_bytes} (read no further)")
    out = {"data": data, "digest": hashlib.sha256(data).hexdigest(), "rgb": None, "size": (0, 0)}
    out["unchanged"] = known == out["digest"] or out["digest"] in known_digests
    if not out["unchanged"]:
        try:
            out["rgb"], out["size"] = decode_sized(data, cfg.image.max_pixels, cfg.image.min_side, **need)
        except Exception as e:  # the row keeps the file's digest
            out["error"] = _err(e)
    return out


def _listed_root(batch: dict, i: int) -> str | None:
    """The folder row ``i``'s file was listed under (None: not known)."""
    return storage.listed_root(str(batch["uri"][i]), batch["rel"][i]) if "rel" in batch else None


def _decoded(batch: dict, config: dict, known_digests: set | None, faults: tuple, need: dict):
    """The decode tasks' common part: every row's file read (and decoded unless unchanged), in order;
    yields (row, what :func:`_read_image` returned or None, error message, milliseconds, config)."""
    _faults.on_batch(faults, "decode")
    cfg = Config.model_validate(config)
    opts = cfg.storage.options()
    known = batch.get("known_digest", [None] * len(batch["uri"]))
    for i, uri in enumerate(batch["uri"]):
        t0 = time.perf_counter()
        got, err = None, ""
        try:
            got = _read_image(uri, known[i], cfg, opts, known_digests or set(), need, _listed_root(batch, i))
            err = got.get("error", "")
        except Exception as e:  # one bad file is one error row
            err = _err(e)
        yield i, got, err, (time.perf_counter() - t0) * 1e3, cfg


# What a batch decoded for a renderer in the same process (:class:`DecodeScoreRender`) may hold for
# its overlays until it renders them, in bytes: decoded pixels (3 bytes each) or files' bytes; 64 MP.
KEEP_BUDGET = 64_000_000 * 3
JPEG_MAX_SIDE = 65535  # the overlay's format: a longer side cannot be encoded


class _Keeper:
    """What :func:`decode_batch` keeps of each decoded image for the overlay, within ``budget`` bytes
    in all (None: no limit): its pixels (``pixels``: decoded at the original size), else its file's
    bytes (``data``), else nothing (the renderer reads the file again)."""

    def __init__(self, n: int, keep_bytes: bool, keep_pixels: bool, budget: int | None):
        self.data, self.pixels = np.array([b""] * n, object), np.array([None] * n, object)
        self.keep_bytes, self.keep_pixels, self.left = keep_bytes, keep_pixels, budget

    def _fits(self, nbytes: int) -> bool:
        if self.left is None:
            return True
        if nbytes > self.left:
            return False
        self.left -= nbytes
        return True

    def add(self, i: int, got: dict) -> None:
        rgb, (h, w) = got["rgb"], got["size"]
        if self.keep_pixels and rgb.shape[:2] == (h, w) and self._fits(rgb.nbytes):
            self.pixels[i] = rgb  # the file's bytes are not needed then
        elif self.keep_bytes and self._fits(len(got["data"])):
            self.data[i] = got["data"]


def decode_batch(batch: dict, config: dict, known_digests: set | None = None, keep_bytes: bool = False,
                 faults: tuple = (), keep_pixels: bool = False, keep_budget: int | None = None) -> dict:
    """Decode task: uri -> digest, original size, the model's uint8 crop; or an error.

    Already processed images are not decoded again (``unchanged``): score's rows carry
    ``known_digest`` (the digest of the image's previous successful row, null if none), fit passes
    ``known_digests`` (features reused).
    ``keep_bytes``: also pass on the file's bytes (column ``data``) for the overlay renderer, so that
    storage is read once per image; :func:`render_batch` drops them again. ``keep_pixels`` (when the
    renderer runs in the same process): also pass on the decoded image (column ``pixels``) where it
    was decoded at its original size, so the overlay does not decode it again (None elsewhere: a large
    JPEG decoded at a reduced scale); its bytes are not passed on then. ``keep_budget``: the most
    bytes of pixels and files' bytes the batch keeps in all (:class:`_Keeper`, in row order; an image
    over it keeps neither, and the renderer reads its file again); None: no limit. ``faults``: the
    fault tests' injected faults (:mod:`.faults`).
    """
    c, resize = config["image"]["crop"], config["image"]["resize"]
    n = len(batch["uri"])
    crops = np.zeros((n, c, c, 3), np.uint8)
    cols = {k: [] for k in ("digest", "height", "width", "error", "decode_ms")}
    unchanged = np.zeros(n, bool)
    keeper = _Keeper(n, keep_bytes, keep_pixels, keep_budget)
    # a large JPEG decodes at a reduced scale, still twice the model's resolution
    for i, got, err, ms, _ in _decoded(batch, config, known_digests, faults, {"shorter_side": 2 * resize}):
        h, w = got["size"] if got else (0, 0)
        if got and not err and not got["unchanged"]:
            try:
                crops[i] = resize_crop(got["rgb"], resize, c, size=(h, w))
            except Exception as e:
                err = _err(e)
        if got and not err and not got["unchanged"]:
            keeper.add(i, got)
        unchanged[i] = bool(got and got["unchanged"])
        for k, v in zip(cols, (got["digest"] if got else "", h, w, err, ms)):
            cols[k].append(v)
    out = dict(batch)
    out.update(digest=np.array(cols["digest"], object), height=np.array(cols["height"], np.int32),
               width=np.array(cols["width"], np.int32), error=np.array(cols["error"], object), crop=crops,
               decode_ms=np.array(cols["decode_ms"], np.float32), unchanged=unchanged)
    if keep_bytes:
        out["data"] = keeper.data
    if keep_pixels:
        out["pixels"] = keeper.pixels
    return out


def decode_tiles(batch: dict, config: dict, known_digests: set | None = None, faults: tuple = ()) -> dict:
    """Decode task with tiling on: one output row per tile (:mod:`..core.tiling`), the image's columns
    repeated, with ``tile`` (its number, row by row) and ``tiles`` (the image's tile count) and the tile's
    pixels as ``crop``. A failed or unchanged image is one row (``tiles`` = 1) with nothing to compute.
    Run it on one image per batch: a large image's tiles are many rows, which the scoring stage's
    batches spread over the actors."""
    from ..core.tiling import cut_tiles, tiling_layout
    c, longer = config["image"]["crop"], config["tiling"]["working_size"]
    parts, rows, tile, tiles = [], [], [], []
    cols = {k: [] for k in ("digest", "height", "width", "error", "decode_ms", "unchanged")}
    for i, got, err, ms, cfg in _decoded(batch, config, known_digests, faults, {"longer_side": longer}):
        h, w = got["size"] if got else (0, 0)
        pixels = np.zeros((1, c, c, 3), np.uint8)
        if got and not err and not got["unchanged"]:
            try:
                layout = tiling_layout(h, w, cfg)
                pixels = cut_tiles(resize_rgb(got["rgb"], (layout.work_h, layout.work_w)), layout)
            except Exception as e:
                err = _err(e)
        n = len(pixels)
        parts.append(pixels)
        rows += [i] * n
        tile += list(range(n))
        tiles += [n] * n
        for k, v in zip(cols, (got["digest"] if got else "", h, w, err, ms, bool(got and got["unchanged"]))):
            cols[k] += [v] + ([0.0 if k == "decode_ms" else v] * (n - 1))
    idx = np.asarray(rows, np.int64)
    out = {k: np.asarray(v)[idx] for k, v in batch.items()}
    out.update(digest=np.array(cols["digest"], object), height=np.array(cols["height"], np.int32),
               width=np.array(cols["width"], np.int32), error=np.array(cols["error"], object),
               crop=np.concatenate(parts), decode_ms=np.array(cols["decode_ms"], np.float32),
               unchanged=np.array(cols["unchanged"], bool), tile=np.array(tile, np.int32),
               tiles=np.array(tiles, np.int32))
    return out


def _to_process(batch: dict) -> np.ndarray:
    """Indices of the rows an actor must run the backbone on: decoded, not failed, not unchanged."""
    return np.nonzero(np.array([not e for e in batch["error"]], bool) & ~np.asarray(batch["unchanged"], bool))[0]


def _without_crop(batch: dict, **columns) -> dict:
    """The batch's columns but the decoded crops (they stay in the actor), plus ``columns``."""
    out = {k: v for k, v in batch.items() if k != "crop"}
    out.update(columns)
    return out


def _per_image_ms(t0: float, n: int) -> np.ndarray:
    return np.full(n, (time.perf_counter() - t0) * 1e3 / max(1, n), np.float32)


def weights_reader(opts: dict, sha256: str | None = None):
    """The backbone's weights reader: any storage URI (the algorithm itself reads local files only);
    with ``sha256`` (a model's recorded weights), other content is refused."""
    return functools.partial(read_weights, opts=opts, sha256=sha256)


def weights_sha256(manifest: dict) -> str | None:
    """The sha256 of the backbone weights a model was fitted with (None: no weights file, or a model
    fitted before they were recorded)."""
    return (manifest.get("backbone_weights") or {}).get("sha256")


def read_weights(uri: str, opts: dict, sha256: str | None = None) -> bytes:
    """Weights of at most MAX_WEIGHTS_BYTES: a local one a regular file (read_local), an object read up
    to one byte over the limit (BackboneError when over). The reader of the jobs and of the API.
    ``sha256``: the content the model was fitted with; a file changed since then would give other
    features against the same memory bank, so it is refused (BackboneError)."""
    from ..core.backbones import MAX_WEIGHTS_BYTES, checked_size, read_local  # torch: in the actors only
    if not storage.is_s3(uri):
        storage.resolve(uri)  # an unsupported scheme: StorageError
        data = read_local(uri)
    else:
        data = storage.read_bytes(uri, limit=MAX_WEIGHTS_BYTES + 1, **opts)
        data = checked_size(uri, data, len(data), MAX_WEIGHTS_BYTES)
    got = hashlib.sha256(data).hexdigest() if sha256 is not None else None
    if got != sha256:
        raise BackboneError(f"backbone weights {uri} are not the file this model was fitted with (sha256 "
                            f"{got[:16]}..., the model recorded {sha256[:16]}...): "
                            "restore that file, or fit the model again with the new weights")
    return data


def _threads(config: Config) -> None:
    import torch
    n = config.runtime.torch_threads or max(1, int(round(config.runtime.actor_cpus)))
    torch.set_num_threads(n)
    import faiss
    from threadpoolctl import threadpool_limits
    faiss.omp_set_num_threads(n)  # the search on the actor's CPUs only
    threadpool_limits(n)  # numpy's BLAS (the pruned search's projection)


class Extract:
    """Fit's actor: backbone + patch features, written to a Parquet shard per batch."""

    def __init__(self, config: dict, model_uri: str, faults: tuple = ()):
        from ..core.patchcore import Embedder
        self.faults = faults
        self.cfg = Config.model_validate(config)
        _threads(self.cfg)
        self.opts = self.cfg.storage.options()
        self.embedder = Embedder(self.cfg, read_weights=weights_reader(self.opts))
        self.model_uri = model_uri
        self.node = node_id()

    def __call__(self, batch: dict) -> dict:
        from ..artifacts.features import write_shard
        n = len(batch["uri"])
        shard = np.array([""] * n, object)
        row = np.full(n, -1, np.int32)
        patches = np.zeros(n, np.int64)
        sha = np.array([""] * n, object)
        nbytes = np.zeros(n, np.int64)
        errors = np.array(batch["error"], object)
        t0 = time.perf_counter()
        idx = _to_process(batch)
        if len(idx):
            try:
                feats, grid = self.embedder(batch["crop"][idx])
                feats = feats.reshape(len(idx), grid[0] * grid[1], -1).cpu().numpy()
                splits = np.asarray(batch["split"])[idx]
                for split in sorted(set(splits)):  # one shard per split: training features, validation
                    sel = np.nonzero(splits == split)[0]
                    name = f"part-{uuid.uuid4().hex}.parquet"
                    info = write_shard(storage.join(self.model_uri, split, name), batch["digest"][idx[sel]],
                                       batch["uri"][idx[sel]], feats[sel], grid, self.opts)
                    shard[idx[sel]] = name
                    row[idx[sel]] = np.arange(len(sel))
                    patches[idx[sel]] = feats.shape[1]
                    sha[idx[sel]] = info["sha256"]
                    nbytes[idx[sel]] = info["bytes"]
            except Exception as e:
                log.exception("feature extraction failed for a batch")
                errors[idx] = f"feature extraction failed: {_err(e)}"
        _faults.on_batch(self.faults, "extract")  # after the batch's shards are written: they become orphans
        return _without_crop(batch, shard=shard, row=row, patches=patches, shard_sha256=sha, shard_bytes=nbytes, error=errors,
                             extract_ms=_per_image_ms(t0, n), node=np.array([self.node] * n, object))


class Score:
    """Score's actor: backbone + memory bank; returns image scores and patch-score grids."""

    def __init__(self, model_uri: str, config: dict, faults: tuple = ()):
        from ..artifacts.model import load_model
        from ..core.patchcore import PatchCore
        self.faults = faults
        self.cfg = Config.model_validate(config)
        _threads(self.cfg)
        opts = self.cfg.storage.options()
        model = load_model(model_uri, opts)
        self.pc = PatchCore(self.cfg, model.bank, index=model.index,
                            read_weights=weights_reader(opts, weights_sha256(model.manifest)))
        self.node = node_id()

    def __call__(self, batch: dict) -> dict:
        n = len(batch["uri"])
        score = np.full(n, np.nan, np.float64)
        grids = np.zeros((n, 1), np.float32)
        gh = np.zeros(n, np.int32)
        gw = np.zeros(n, np.int32)
        errors = np.array(batch["error"], object)
        t0 = time.perf_counter()
        idx = _to_process(batch)
        try:
            _faults.on_batch(self.faults, "score")
            if len(idx):
                pred = self.pc.predict(batch["crop"][idx], maps=False)
                score[idx] = pred.image_scores
                h, w = pred.patch_scores.shape[1:]
                grids = np.zeros((n, h * w), np.float32)
                grids[idx] = pred.patch_scores.reshape(len(idx), -1)
                gh[idx], gw[idx] = h, w
        except Exception as e:
            log.exception("scoring failed for a batch")
            errors[idx] = f"scoring failed: {_err(e)}"
        return _without_crop(batch, score=score, patch_scores=grids, grid_h=gh, grid_w=gw, error=errors,
                             score_ms=_per_image_ms(t0, n), node=np.array([self.node] * n, object))


class DecodeScoreRender(Score):
    """Score's actor on CPU nodes (and the in-process executor's scorer): each batch decoded, scored
    and (with ``render``: render_batch's keyword arguments) rendered in the actor. On CPUs the three
    stages compete for the same cores
    anyway; as separate Ray stages the decoded images (with the originals' bytes, for overlays) and
    the score grids cross the object store, and Ray Data schedules decode and render tasks between
    the actors' batches. Measured on 2 cores (benchmarks/score_job.py, 480 mixed images, heatmaps
    and overlays): 7.7 -> 19.5-21.5 images/s.

    Memory: between decoding and rendering a batch the actor keeps, for the overlays, at most
    ``keep_budget`` bytes (default :data:`KEEP_BUDGET`, 64 MP of pixels) of the originals: each
    image's decoded pixels while they fit, else its file's bytes while they fit, else nothing (the
    renderer reads and decodes that file again); never both for one image. So a batch of 100 MP
    originals holds one image at a time, not the batch's pixels and bytes (2.5-4 GB at 8 images)."""

    def __init__(self, model_uri: str, config: dict, faults: tuple = (), keep_bytes: bool = False,
                 render: dict | None = None, keep_budget: int = KEEP_BUDGET):
        super().__init__(model_uri, config, faults)
        self.config, self.keep_bytes, self.render, self.keep_budget = config, keep_bytes, render, keep_budget

    def __call__(self, batch: dict) -> dict:
        decoded = decode_batch(batch, self.config, keep_bytes=self.keep_bytes, faults=self.faults,
                               keep_pixels=self.keep_bytes and self.render is not None, keep_budget=self.keep_budget)
        scored = super().__call__(decoded)
        return render_batch(scored, **self.render, faults=self.faults) if self.render else scored


def render_batch(batch: dict, config: dict, heatmaps_uri: str, vrange: tuple[float, float], faults: tuple = (),
                 peak_normalise: bool = True, only_above: float | None = None) -> dict:
    """Render task: anomaly map at the original resolution (capped at render.heatmap.MAX_RENDER_PIXELS)
    -> heatmap PNG (and an overlay JPEG) under ``heatmaps_uri``, mirroring each input's relative path
    with its extension (cat.jpg -> cat.jpg.png, so cat.png and cat.jpg stay apart). The map is
    peak-normalised (its maximum reads the image score; not for models fitted before the scale was
    calibrated on such maps) and coloured on the fixed scale ``vrange``. A heatmap that cannot be made
    or written never costs the image its score: ``heatmap`` stays null and the reason is in
    ``warning``. Only in the pipeline when output.heatmaps is on; ``only_above`` (output.heatmaps=anomalies:
    the decision threshold): only images scoring above it get heatmaps."""
    _faults.on_batch(faults, "render")
    cfg = Config.model_validate(config)
    opts = cfg.storage.options()
    n = len(batch["uri"])
    heatmap = np.array([None] * n, object)
    warning = np.array([""] * n, object)
    for i in range(n):
        if batch["error"][i] or batch["unchanged"][i]:
            continue
        if only_above is not None and not float(batch["score"][i]) > only_above:
            continue
        try:
            heatmap[i], warning[i] = _render_one(batch, i, cfg, heatmaps_uri, vrange, opts, peak_normalise)
        except Exception as e:
            warning[i] = f"heatmap not written: {_err(e)}"
        if warning[i]:
            log.warning("%s: %s", repr(str(batch["uri"][i])), warning[i])
    out = {k: v for k, v in batch.items() if k not in ("data", "pixels")}  # the images' bytes stop here
    out.update(heatmap=heatmap, warning=warning)
    return out


def _render_one(batch: dict, i: int, cfg: Config, heatmaps_uri: str, vrange: tuple[float, float],
                opts: dict, peak_normalise: bool = True) -> tuple[str, str]:
    """Image ``i``'s heatmap PNG and overlay JPEG; returns the heatmap's URI and a warning ("" or why the
    overlay was not written)."""
    from ..core.tiling import anomaly_map_of
    h, w = int(batch["grid_h"][i]), int(batch["grid_w"][i])
    height, width = int(batch["height"][i]), int(batch["width"][i])
    size = render_size(height, width)
    amap = anomaly_map_of(batch["patch_scores"][i], (h, w), height, width, cfg, size)
    if peak_normalise and "score" in batch:
        amap = peak_normalised(amap, float(batch["score"][i]))
    level = heat_index(amap, vrange)  # once, for the colours and the overlay's opacity
    rgb = colorize(amap, vrange, level)
    base = storage.join(heatmaps_uri, storage.safe_relpath(str(batch["rel"][i])))
    storage.write_bytes(base + ".png", encode(rgb, **PNG_OPTIONS), **opts, durable=False)
    if not cfg.output.overlay:
        return base + ".png", ""
    if max(size) > JPEG_MAX_SIDE:  # checked before the original is decoded again for nothing
        return base + ".png", f"overlay not written: JPEG takes at most {JPEG_MAX_SIDE} pixels a side, the " \
                              f"overlay is {size[0]}x{size[1]}"
    try:
        orig = _original(batch, i, cfg, opts, size)
        blended = overlay(resize_rgb(orig, size), rgb, amap, vrange, level)
        storage.write_bytes(base + "_overlay.jpg", encode(blended, "JPEG", quality=90), **opts, durable=False)
    except Exception as e:
        return base + ".png", f"overlay not written: {_err(e)}"
    return base + ".png", ""


def _original(batch: dict, i: int, cfg: Config, opts: dict, size: tuple[int, int]):
    """Image ``i``'s pixels for its overlay (at least ``size``'s resolution): those decoded in this
    process (``pixels``, at the original size), else decoded from the bytes the decode step read
    (``data``), else from the file read again, which must still be the file that was scored."""
    orig = batch["pixels"][i] if "pixels" in batch else None
    if orig is not None:
        return orig
    data = batch["data"][i] if "data" in batch else b""
    if not len(data):  # not kept (keep_bytes off, or over the batch's keep_budget)
        data = storage.read_bytes(str(batch["uri"][i]), **opts, limit=cfg.image.max_bytes + 1,
                                  within=_listed_root(batch, i))
        if "digest" in batch and hashlib.sha256(data).hexdigest() != batch["digest"][i]:
            raise ImageError("the file changed since it was scored")
    return decode_sized(bytes(data), cfg.image.max_pixels, cfg.image.min_side, shorter_side=min(size))[0]
