"""Patch-feature shards (Parquet) and the driver's streaming pass over them.

Shard schema, one row per image:

    image_id  string                 content sha256 of the image file
    uri       string                 where the image was read
    grid_h    int32, grid_w int32    patch grid
    dim       int32                  feature dimension D
    features  fixed_size_list<float16>[grid_h*grid_w*D]   row-major (patch, dim)
"""
from __future__ import annotations

import hashlib
import io
import logging
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from . import storage
from ..core.coreset import project
from ..errors import JobError, ShardError
from .model import sha256

log = logging.getLogger(__name__)


def shard_bytes(image_ids: list[str], uris: list[str], feats: np.ndarray, grid: tuple[int, int]) -> bytes:
    """feats [B, h*w, D] -> Parquet bytes."""
    b, l, d = feats.shape
    flat = pa.array(feats.astype(np.float16).reshape(-1), type=pa.float16())
    table = pa.table({
        "image_id": pa.array(image_ids, pa.string()),
        "uri": pa.array(uris, pa.string()),
        "grid_h": pa.array([grid[0]] * b, pa.int32()),
        "grid_w": pa.array([grid[1]] * b, pa.int32()),
        "dim": pa.array([d] * b, pa.int32()),
        "features": pa.FixedSizeListArray.from_arrays(flat, l * d),
    })
    return storage.parquet_bytes(table, row_group_size=max(1, b))


def write_shard(uri: str, image_ids, uris, feats, grid, storage_options: dict | None = None) -> dict:
    data = shard_bytes(list(image_ids), list(uris), feats, grid)
    storage.write_bytes(uri, data, **(storage_options or {}))
    return {"sha256": sha256(data), "bytes": len(data)}


def read_shard(uri: str, storage_options: dict | None = None, rows: list[int] | None = None,
               sha256: str | None = None) -> tuple[pa.Table, np.ndarray]:
    """-> (metadata table without features, features [rows, h*w, D] float16); verified if sha256 is given."""
    data = storage.read_bytes(uri, **(storage_options or {}))
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise ShardError(f"{uri} does not match its sha256 in the manifest (corrupt or changed)")
    table = pq.read_table(io.BytesIO(data))
    if rows is not None:
        table = table.take(pa.array(rows, pa.int64()))
    d = table["dim"][0].as_py() if len(table) else 0
    col = table["features"].combine_chunks()
    values = col.flatten().to_numpy(zero_copy_only=False)
    feats = values.reshape(len(table), -1, d) if len(table) else np.zeros((0, 0, 0), np.float16)
    return table.drop(["features"]), feats


def project_shards(shards: list[str], matrix: torch.Tensor | None, storage_options: dict | None = None
                   ) -> tuple[torch.Tensor, list[tuple[str, int, int]]]:
    """Stream every shard, project its patches on the fly; only the projected matrix is kept.

    Returns the projected features [N, p] and, per shard, (uri, images, patches per image) so that
    a global patch index can be mapped back to (shard, row, patch).
    """
    parts, layout = [], []
    t0 = last = time.time()
    for i, uri in enumerate(shards):
        _, feats = read_shard(uri, storage_options)
        n_img, l, d = feats.shape
        x = torch.from_numpy(feats.reshape(-1, d).astype(np.float32))
        parts.append(project(x, matrix))
        layout.append((uri, n_img, l))
        if time.time() - last > 10:
            last = time.time()
            log.info("projecting features: shard %d / %d, %.1f s", i + 1, len(shards), last - t0)
    return torch.cat(parts), layout


def gather_rows(indices: np.ndarray, layout: list[tuple[str, int, int]], storage_options: dict | None = None,
                extra: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Full-dimension float32 rows for global patch ``indices`` (and for ``extra`` indices), shard by shard."""
    offsets = np.cumsum([0] + [n * l for _, n, l in layout])
    want = np.asarray(indices, dtype=np.int64)
    extra = np.asarray(extra if extra is not None else [], dtype=np.int64)
    out = out_extra = None
    for s, (uri, _, _) in enumerate(layout):
        lo, hi = offsets[s], offsets[s + 1]
        sel = np.nonzero((want >= lo) & (want < hi))[0]
        sel_x = np.nonzero((extra >= lo) & (extra < hi))[0]
        if len(sel) == 0 and len(sel_x) == 0:
            continue
        _, feats = read_shard(uri, storage_options)
        flat = feats.reshape(-1, feats.shape[-1])
        if out is None:
            out = np.zeros((len(want), flat.shape[1]), np.float32)
            out_extra = np.zeros((len(extra), flat.shape[1]), np.float32)
        out[sel] = flat[want[sel] - lo]
        out_extra[sel_x] = flat[extra[sel_x] - lo]
    return out, out_extra


def copy_reused(rows: dict, reusable: dict, model: str, opts: dict) -> None:
    """Copy the feature rows of unchanged images from the old model's shards into new shards of ``model``.

    ``rows`` are the fit's per-image columns; ``reusable`` maps a content digest to (old shard URI,
    row, sha256) (:func:`patchcore_dist.artifacts.model.reusable_features`). Each reused image's
    shard, row, patches, shard_sha256 and shard_bytes are updated in place.
    """
    by_shard: dict[tuple[str, str], list[int]] = {}
    for i, (unchanged, digest, split) in enumerate(zip(rows["unchanged"], rows["digest"], rows["split"])):
        if unchanged:
            by_shard.setdefault((reusable[digest][0], split), []).append(i)
    for (old_shard, split), idx in sorted(by_shard.items()):
        want = [reusable[rows["digest"][i]][1] for i in idx]
        try:
            meta, feats = read_shard(old_shard, opts, rows=want, sha256=reusable[rows["digest"][idx[0]]][2])
        except ShardError as e:
            raise JobError(f"--reuse: {e}; no model was written") from None
        grid = (meta["grid_h"][0].as_py(), meta["grid_w"][0].as_py())
        name = f"part-reused-{hashlib.sha256((old_shard + split).encode()).hexdigest()[:16]}.parquet"
        info = write_shard(storage.join(model, split, name), [rows["digest"][i] for i in idx],
                           [rows["uri"][i] for i in idx], feats, grid, opts)
        for j, i in enumerate(idx):
            rows["shard"][i], rows["row"][i], rows["patches"][i] = name, j, feats.shape[1]
            rows["shard_sha256"][i], rows["shard_bytes"][i] = info["sha256"], info["bytes"]
    log.info("reused the features of %d unchanged images from %d shards", sum(len(v) for v in by_shard.values()),
             len(by_shard))
