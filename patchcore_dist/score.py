"""score: model + image archive -> score table (Parquet), heatmaps (PNG), on Ray.

    <output>/scores/part-<run>-<seq>.parquet   the score table, one row per input image
    <output>/heatmaps/<relative path>.png       colour-mapped anomaly map, original resolution
    <output>/heatmaps/<relative path>_overlay.jpg
"""
from __future__ import annotations

import datetime as _dt
import io
import logging
import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import storage
from .cluster import actor_pool, init_ray
from .config import Config, load_config
from .fit import JobError, list_images
from .model import ModelError, load_model
from .stages import Score, decode_batch, render_batch

log = logging.getLogger(__name__)

SCORE_SCHEMA = pa.schema([
    ("image", pa.string()),          # input URI
    ("score", pa.float64()),         # image score s* (null when error is set)
    ("heatmap", pa.string()),        # heatmap PNG URI (null when none was written)
    ("height", pa.int32()),          # original image size (0 when it could not be decoded)
    ("width", pa.int32()),
    ("model", pa.string()),          # the model's digest
    ("error", pa.string()),          # null, or why the image could not be scored
    ("digest", pa.string()),         # sha256 of the image file
    ("decode_ms", pa.float32()),
    ("score_ms", pa.float32()),
    ("scored_at", pa.timestamp("s", tz="UTC")),
])
GRID_FIELDS = [("grid_h", pa.int32()), ("grid_w", pa.int32()), ("patch_scores", pa.list_(pa.float32()))]


def score_config(model_config: Config, config_file: str | None, overrides: list[str]) -> Config:
    """The model's config, with the user's scoring, runtime, output and storage settings.

    Keys that define the patch features (backbone, image geometry, embedding) must equal the model's.
    """
    merged = model_config.to_dict()
    if config_file:
        user = load_config(config_file)
        if user.feature_digest() != model_config.feature_digest():
            raise JobError(_incompatible(model_config, user))
        for section in ("scoring", "runtime", "output", "storage"):
            merged[section] = user.to_dict()[section]
    cfg = load_config(base=merged, overrides=overrides)
    if cfg.feature_digest() != model_config.feature_digest():
        raise JobError(_incompatible(model_config, cfg))
    return cfg


def _incompatible(model: Config, user: Config) -> str:
    a, b = model.feature_dict(), user.feature_dict()
    diffs = [f"{s}.{k}: model {a[s][k]!r}, given {b[s].get(k)!r}" for s in a for k in a[s] if a[s][k] != b[s].get(k)]
    return "incompatible config: the model's features were built with other settings (" + "; ".join(diffs) + ")"


def _write_part(output: str, run: str, seq: int, rows: list[dict], schema: pa.Schema, opts: dict) -> str:
    table = pa.Table.from_pylist(rows, schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    uri = storage.join(output, "scores", f"part-{run}-{seq:05d}.parquet")
    storage.write_bytes(uri, buf.getvalue(), **opts)
    return uri


def run_score(model_uri: str, images: str, output: str, config_file: str | None = None,
              overrides: list[str] | None = None, part_rows: int = 50000) -> dict:
    t_start = time.time()
    pre = load_config(config_file, overrides)  # validates the user's settings before any work
    opts = {"endpoint_url": pre.storage.endpoint_url, "region": pre.storage.region}
    try:
        model = load_model(model_uri, opts)
    except ModelError as e:
        raise JobError(f"cannot score: {e}") from None
    config = score_config(model.config, config_file, overrides or [])
    files = list_images(images, opts, "images")
    log.info("score: %d images under %s with model %s (digest %s, bank %d x %d) -> %s", len(files), images,
             model_uri, model.digest, *model.bank.shape, output)
    lo, hi = model.heatmap_range
    vrange = (config.output.heatmap_min if config.output.heatmap_min is not None else lo,
              config.output.heatmap_max or hi)
    if vrange[1] <= vrange[0]:
        raise JobError(f"heatmap scale [{vrange[0]}, {vrange[1]}] is empty: set output.heatmap_max above heatmap_min")
    ray = init_ray(config)
    cfg = config.to_dict()
    bs = config.runtime.batch_size
    ds = ray.data.from_items([{"uri": u, "rel": r} for u, r in files], override_num_blocks=max(1, min(len(files), 64)))
    ds = ds.map_batches(decode_batch, fn_kwargs={"config": cfg}, batch_size=bs, num_cpus=0.5)
    ds = ds.map_batches(Score, fn_constructor_args=(model_uri, cfg), batch_size=bs, **actor_pool(config))
    ds = ds.map_batches(render_batch, fn_kwargs={"config": cfg, "output_uri": output, "vrange": vrange},
                        batch_size=bs, num_cpus=0.5)
    schema = SCORE_SCHEMA
    if config.output.patch_scores:
        schema = pa.schema(list(SCORE_SCHEMA) + [pa.field(n, t) for n, t in GRID_FIELDS])
    run = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    pending, parts = [], []
    done = errors = 0
    last = time.time()
    now = _dt.datetime.now(_dt.timezone.utc)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for i in range(len(batch["uri"])):
            err = batch["error"][i] or None
            row = {
                "image": str(batch["uri"][i]),
                "score": None if (err and not np.isfinite(batch["score"][i])) else float(batch["score"][i]),
                "heatmap": batch["heatmap"][i], "height": int(batch["height"][i]),
                "width": int(batch["width"][i]), "model": model.digest, "error": err,
                "digest": batch["digest"][i] or None, "decode_ms": float(batch["decode_ms"][i]),
                "score_ms": float(batch["score_ms"][i]), "scored_at": now,
            }
            if config.output.patch_scores:
                h, w = int(batch["grid_h"][i]), int(batch["grid_w"][i])
                row.update(grid_h=h, grid_w=w, patch_scores=batch["patch_scores"][i][: h * w].tolist() if h else None)
            pending.append(row)
            errors += bool(err)
        done += len(batch["uri"])
        if len(pending) >= part_rows:
            parts.append(_write_part(output, run, len(parts), pending, schema, opts))
            pending = []
        if time.time() - last > 5:
            last = time.time()
            log.info("scoring: %d / %d images (%d errors), %.1f images/s", done, len(files), errors,
                     done / (last - t_start))
    if pending or not parts:
        parts.append(_write_part(output, run, len(parts), pending, schema, opts))
    elapsed = time.time() - t_start
    summary = {"images": len(files), "rows": done, "errors": errors, "seconds": round(elapsed, 2),
               "images_per_s": round(done / elapsed, 2), "scores": storage.join(output, "scores"),
               "heatmaps": storage.join(output, "heatmaps") if config.output.heatmaps else None,
               "model": model.digest, "parts": parts}
    if done != len(files):
        raise JobError(f"internal error: {done} rows for {len(files)} images")
    log.info("score done: %d images, %d errors, %.1f images/s; scores in %s%s", len(files), errors,
             summary["images_per_s"], summary["scores"],
             f", heatmaps in {summary['heatmaps']}" if summary["heatmaps"] else "")
    return summary


def read_scores(output: str, opts: dict | None = None) -> pa.Table:
    """The whole score table under <output>/scores/."""
    files = storage.list_files(storage.join(output, "scores"), (".parquet",), **(opts or {}))
    tables = [pq.read_table(io.BytesIO(storage.read_bytes(u, **(opts or {})))) for u, _ in files]
    return pa.concat_tables(tables, promote_options="default") if tables else pa.Table.from_pylist([], SCORE_SCHEMA)
