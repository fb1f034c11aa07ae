"""fit: normal images -> model directory (memory bank + faiss index + manifest), on Ray.

Workers decode images and extract patch features into Parquet shards under <model>/features/.
The driver streams the shards, projects them on the fly (only the N x projection_dim matrix is
held), runs the greedy coreset, and gathers the full-dimension rows it selected.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from . import coreset as coreset_mod
from . import storage
from .cluster import actor_pool, init_ray
from .config import Config
from .features import gather_rows, project_shards
from .memory_bank import MemoryBank
from .model import MANIFEST, ModelWriter, config_yaml, npy_bytes
from .preprocessing import IMAGE_EXTENSIONS
from .stages import Extract, decode_batch

log = logging.getLogger(__name__)


class JobError(RuntimeError):
    """A job that cannot start or complete; the message says why. Nothing half-written is committed."""


def resolve_train_root(uri: str, opts: dict) -> str:
    """An MVTec AD category root (with train/good) stands for its train/good folder."""
    candidate = storage.join(uri, "train", "good")
    if storage.is_dir(candidate, **opts):
        log.info("%s is an MVTec AD category: fitting on train/good", uri)
        return candidate
    return uri


def list_images(uri: str, opts: dict, what: str) -> list[tuple[str, str]]:
    try:
        files = storage.list_files(uri, IMAGE_EXTENSIONS, **opts)
    except FileNotFoundError:
        raise JobError(f"{what} not found: {uri}") from None
    except storage.StorageError as e:
        raise JobError(f"cannot list {what} {uri}: {e}") from None
    if not files:
        raise JobError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {what} {uri}")
    return files


def _table(rows: dict[str, list]) -> pa.Table:
    return pa.table(rows)


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def run_fit(train: str, model: str, config: Config) -> dict:
    t_start = time.time()
    opts = {"endpoint_url": config.storage.endpoint_url, "region": config.storage.region}
    if storage.exists(storage.join(model, MANIFEST), **opts):
        raise JobError(f"{model} already holds a committed model; models are never changed in place: "
                       "write the new model to a new URI")
    root = resolve_train_root(train, opts)
    files = list_images(root, opts, "training images")
    log.info("fit: %d training images under %s -> model %s", len(files), root, model)

    ray = init_ray(config)
    cfg = config.to_dict()
    features_uri = storage.join(model, "features")
    ds = ray.data.from_items([{"uri": u, "rel": r} for u, r in files],
                             override_num_blocks=max(1, min(len(files), 64)))
    ds = ds.map_batches(decode_batch, fn_kwargs={"config": cfg}, batch_size=config.runtime.batch_size,
                        num_cpus=0.5)
    ds = ds.map_batches(Extract, fn_constructor_args=(cfg, features_uri), batch_size=config.runtime.batch_size,
                        **actor_pool(config))
    cols = ["uri", "rel", "digest", "height", "width", "error", "shard", "row", "shard_sha256", "shard_bytes"]
    rows = {c: [] for c in cols}
    done = errors = 0
    last = time.time()
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for c in cols:
            rows[c].extend(batch[c].tolist())
        done += len(batch["uri"])
        errors += sum(1 for e in batch["error"] if e)
        if time.time() - last > 5:
            last = time.time()
            log.info("extracting: %d / %d images (%d errors), %.1f images/s", done, len(files), errors,
                     done / (last - t_start))
    t_extract = time.time() - t_start
    images = _table({c: rows[c] for c in cols})
    ok = [not e for e in rows["error"]]
    n_ok = int(sum(ok))
    writer = ModelWriter(model, opts)
    if n_ok == 0:
        raise JobError(f"none of the {len(files)} training images could be used; first errors: "
                       + "; ".join(f"{r}: {e}" for r, e in zip(rows["rel"], rows["error"]) if e)[:800]
                       + " (no model was written)")
    if errors:
        log.warning("%d of %d training images could not be used (listed in %s/errors.parquet)", errors,
                    len(files), model)
    # Coreset on the projected features, streamed shard by shard.
    shards = sorted({s for s, o in zip(rows["shard"], ok) if o})
    for name in shards:
        i = rows["shard"].index(name)
        writer.record(f"features/{name}", rows["shard_sha256"][i], int(rows["shard_bytes"][i]))
    bank, stats = build_memory_bank([storage.join(features_uri, s) for s in shards], config, opts)
    # Write the model; the manifest goes last.
    writer.put("memory_bank.npy", npy_bytes(bank))
    writer.put("index.faiss", MemoryBank(bank).serialize())
    writer.put("config.yaml", config_yaml(config))
    writer.put("images.parquet", _parquet_bytes(images))
    err_idx = [i for i, o in enumerate(ok) if not o]
    writer.put("errors.parquet", _parquet_bytes(pa.table({
        "image": [rows["uri"][i] for i in err_idx], "error": [rows["error"][i] for i in err_idx]},
        schema=pa.schema([("image", pa.string()), ("error", pa.string())]))))
    digest = hashlib.sha256("\n".join(sorted(d for d, o in zip(rows["digest"], ok) if o)).encode()).hexdigest()
    training = {"uri": root, "images": len(files), "used": n_ok, "errors": errors, "digest": digest[:16],
                "patches": stats.pop("patches")}
    manifest = writer.commit(config, bank.shape, training, stats)
    elapsed = time.time() - t_start
    log.info("fit done: %d images (%d errors), %d patches -> memory bank %d x %d, extraction %.1f s, "
             "total %.1f s; model %s (digest %s)", len(files), errors, training["patches"], bank.shape[0],
             bank.shape[1], t_extract, elapsed, model, manifest["model_digest"])
    return manifest


def build_memory_bank(shard_uris: list[str], config: Config, opts: dict) -> tuple[np.ndarray, dict]:
    """Stream shards -> projected matrix -> greedy coreset -> full-dimension memory bank + score stats."""
    c = config.coreset
    t0 = time.time()
    matrix = coreset_mod.projection_matrix(config.embedding.target_dim, c.projection_dim, config.seed)
    projected, layout = project_shards(shard_uris, matrix, opts)
    n = len(projected)
    k = coreset_mod.coreset_size(n, c.ratio, c.size)
    log.info("coreset: %d patches projected to %d dims in %.1f s; selecting %d (%.2f%%)", n,
             projected.shape[1], time.time() - t0, k, 100.0 * k / n)
    t1 = time.time()
    if k >= n:
        selected = np.arange(n)
    else:
        selected = coreset_mod.greedy_coreset(projected, k, config.seed, c.num_starting_points, c.device).numpy()
    t_coreset = time.time() - t1
    del projected
    # A sample of training patches, scored against the bank, fixes the model's score scale.
    rng = np.random.default_rng(config.seed)
    sample = rng.choice(n, size=min(n, 20000), replace=False)
    bank, sample_feats = gather_rows(selected, layout, opts, extra=sample)
    d, _ = MemoryBank(bank).search(sample_feats, 1)
    d = d[:, 0].numpy()
    q = {f"p{p}": float(np.percentile(d, p)) for p in (50, 90, 99, 99.9)}
    # Heatmap colour scale, fixed per model: typical normal patches at the cold end, twice the
    # 99th percentile of normal patch scores at the hot end.
    heatmap_min = q["p50"]
    heatmap_max = max(2.0 * q["p99"], heatmap_min + 1e-6)
    stats = {"patches": int(n), "coreset_seconds": round(t_coreset, 3), "train_patch_score": q,
             "heatmap_min": heatmap_min, "heatmap_max": heatmap_max}
    log.info("coreset done in %.1f s; training patch scores p50 %.3f p99 %.3f; heatmap scale [%.3f, %.3f]",
             t_coreset, q["p50"], q["p99"], heatmap_min, heatmap_max)
    return bank, stats
