"""score: model + image archive -> score table (Parquet), heatmaps (PNG), on Ray.

    <output>/scores/<model digest>/part-<run>-<seq>.parquet   the score table, one row per image and model
    <output>/heatmaps/<model digest>/<relative path>.png       colour-mapped anomaly map, original resolution
    <output>/heatmaps/<model digest>/<relative path>_overlay.jpg
"""
from __future__ import annotations

import datetime as _dt
import logging
import time
import uuid

import numpy as np
import pyarrow as pa

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
    ("is_anomaly", pa.bool_()),      # score > the model's calibrated threshold (null without one)
    ("heatmap", pa.string()),        # heatmap PNG URI (null when none was written)
    ("height", pa.int32()),          # original image size (0 when it could not be decoded)
    ("width", pa.int32()),
    ("model", pa.string()),          # the model's digest
    ("error", pa.string()),          # null, or why the image could not be scored
    ("digest", pa.string()),         # sha256 of the image file
    ("size", pa.int64()),            # file size and modification time (seconds) when scored
    ("mtime", pa.float64()),
    ("decode_ms", pa.float32()),
    ("score_ms", pa.float32()),
    ("scored_at", pa.timestamp("s", tz="UTC")),
])
GRID_FIELDS = [("grid_h", pa.int32()), ("grid_w", pa.int32()), ("patch_scores", pa.list_(pa.float32()))]


def score_config(model_config: Config, user: Config, config_file: str | None, overrides: list[str]) -> Config:
    """The config a scoring run uses.

    Feature-defining keys (backbone, image geometry, embedding) come from the model and must not
    be changed; scoring and index search settings come from the model unless the user's config file
    or overrides set them; runtime, output and storage are this run's (the user's config file, or the
    default config, plus overrides: ``user``), never the settings the model happened to be fitted with.
    """
    merged = model_config.to_dict()
    for section in ("runtime", "output", "storage"):
        merged[section] = user.to_dict()[section]
    if config_file:
        if user.feature_digest() != model_config.feature_digest():
            raise JobError(_incompatible(model_config, user))
        merged["scoring"] = user.to_dict()["scoring"]
    cfg = load_config(base=merged, overrides=[o for o in overrides
                                              if o.split("=", 1)[0].split(".")[0] not in ("runtime", "output", "storage")])
    if cfg.feature_digest() != model_config.feature_digest():
        raise JobError(_incompatible(model_config, cfg))
    return cfg


def _incompatible(model: Config, user: Config) -> str:
    a, b = model.feature_dict(), user.feature_dict()
    diffs = [f"{s}.{k}: model {a[s][k]!r}, given {b[s].get(k)!r}" for s in a for k in a[s] if a[s][k] != b[s].get(k)]
    return "incompatible config: the model's features were built with other settings (" + "; ".join(diffs) + ")"


def _write_part(output: str, model: str, run: str, seq: int, rows: list[dict], schema: pa.Schema,
                opts: dict) -> str:
    uri = storage.join(output, "scores", model, f"part-{run}-{seq:05d}.parquet")
    storage.write_bytes(uri, storage.parquet_bytes(pa.Table.from_pylist(rows, schema=schema)), **opts)
    return uri


def _read_parts(output: str, model: str, opts: dict) -> list[tuple[str, pa.Table]]:
    try:
        files = storage.list_files(storage.join(output, "scores", model), (".parquet",), **opts)
    except FileNotFoundError:
        return []
    return [(u, storage.read_parquet(u, **opts)) for u, _ in files]


def compact(parts: list[tuple[str, pa.Table]], opts: dict, superseded: frozenset | set = frozenset()
            ) -> tuple[list[tuple[str, pa.Table]], int]:
    """Keep one row per image in a model's score partition: the newest (parts are named by run time),
    and none for the images in ``superseded`` (just scored again, in a newer part).

    Affected parts are rewritten atomically or deleted when emptied. Runs at the start of every score
    (cleaning up after an interrupted run) on the parts it has read, and at the end on the same parts
    with this run's images. Returns the surviving (uri, table) parts and the number of rows dropped.
    """
    newest = {}
    for pi, (_, t) in enumerate(parts):  # sorted by name = by run
        for ri, img in enumerate(t.column("image").to_pylist()):
            newest[img] = (pi, ri)
    kept, dropped = [], 0
    for pi, (uri, t) in enumerate(parts):
        keep = [ri for ri, img in enumerate(t.column("image").to_pylist())
                if newest[img] == (pi, ri) and img not in superseded]
        if len(keep) == t.num_rows:
            kept.append((uri, t))
            continue
        dropped += t.num_rows - len(keep)
        if keep:
            t = t.take(pa.array(keep, pa.int64()))
            storage.write_bytes(uri, storage.parquet_bytes(t), **opts)
            kept.append((uri, t))
        else:
            storage.delete(uri, **opts)
    return kept, dropped


def _text(v) -> str | None:
    """A string cell from a Ray batch; all-null columns come back as NaN floats."""
    return v if isinstance(v, str) and v else None


def run_score(model_uri: str, images: str, output: str, config_file: str | None = None,
              overrides: list[str] | None = None, rescore: str = "changed", part_rows: int = 50000) -> dict:
    """Score every image under ``images``; incremental unless ``rescore == "all"``.

    An image is skipped when this model already has a successful row for it with the same size and
    modification time, or (checked after reading it) the same content digest. Failed images are
    retried. One row per image and model, always.
    """
    if rescore not in ("changed", "all"):
        raise JobError(f"--rescore must be 'changed' or 'all', got {rescore!r}")
    t_start = time.time()
    pre = load_config(config_file, overrides)  # validates the user's settings before any work
    opts = pre.storage.options()
    try:
        model = load_model(model_uri, opts)
    except ModelError as e:
        raise JobError(f"cannot score: {e}") from None
    config = score_config(model.config, pre, config_file, overrides or [])
    entries = list_images(images, opts, "images")
    digest = model.digest
    parts_before, dropped = compact(_read_parts(output, digest, opts), opts)
    if dropped:
        log.info("removed %d superseded rows left by an interrupted run", dropped)
    previous = {}
    if rescore == "changed":
        for _, t in parts_before:
            for r in t.to_pylist():
                if r["error"] is None:
                    previous[r["image"]] = r
    todo = [e for e in entries if not (e["uri"] in previous and previous[e["uri"]]["size"] == e["size"]
                                       and previous[e["uri"]]["mtime"] == e["mtime"])]
    log.info("score: %d images under %s with model %s (digest %s, bank %d x %d) -> %s", len(entries), images,
             model_uri, digest, *model.bank.shape, output)
    if not todo:
        log.info("score: all %d images already have rows for model %s in %s: nothing to do (no backbone work; "
                 "--rescore all forces it)", len(entries), digest, storage.join(output, "scores", digest))
        return {"images": len(entries), "scored": 0, "skipped": len(entries), "errors": 0, "rows": 0,
                "seconds": round(time.time() - t_start, 2), "images_per_s": 0.0, "model": digest,
                "scores": storage.join(output, "scores", digest), "parts": [], "config": config}
    if len(todo) < len(entries):
        log.info("incremental: %d of %d images already scored by this model; scoring %d new or changed",
                 len(entries) - len(todo), len(entries), len(todo))
    known = {e["uri"]: previous[e["uri"]]["digest"] for e in todo if e["uri"] in previous}
    lo, hi = model.heatmap_range
    vrange = (config.output.heatmap_min if config.output.heatmap_min is not None else lo,
              config.output.heatmap_max or hi)
    if vrange[1] <= vrange[0]:
        raise JobError(f"heatmap scale [{vrange[0]}, {vrange[1]}] is empty: set output.heatmap_max above heatmap_min")
    threshold = model.manifest["stats"].get("threshold")
    ray = init_ray(config)
    cfg = config.to_dict()
    pool = actor_pool(config)  # its batch size suits the actors' device
    bs = pool["batch_size"]
    meta = {e["uri"]: e for e in todo}
    ds = ray.data.from_items([{"uri": e["uri"], "rel": e["rel"]} for e in todo],
                             override_num_blocks=max(1, min(len(todo), 200)))
    keep_bytes = config.output.heatmaps and config.output.overlay  # the overlay needs the original pixels
    ds = ds.map_batches(decode_batch, fn_kwargs={"config": cfg, "known_uris": known, "keep_bytes": keep_bytes},
                        batch_size=bs, num_cpus=0.5)
    ds = ds.map_batches(Score, fn_constructor_args=(model_uri, cfg), **pool)
    if config.output.heatmaps:
        ds = ds.map_batches(render_batch, fn_kwargs={"config": cfg, "vrange": vrange,
                                                     "heatmaps_uri": storage.join(output, "heatmaps", digest)},
                            batch_size=bs, num_cpus=0.5)
    schema = SCORE_SCHEMA
    if config.output.patch_scores:
        schema = pa.schema(list(SCORE_SCHEMA) + [pa.field(n, t) for n, t in GRID_FIELDS])
    run = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    pending, parts, seen = {}, [], set()
    done = errors = unchanged = 0
    last = time.time()
    now = _dt.datetime.now(_dt.timezone.utc)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for i in range(len(batch["uri"])):
            uri = str(batch["uri"][i])
            if uri in seen or uri in pending:  # a retried task's output: one row per image
                continue
            done += 1
            if batch["unchanged"][i]:
                # Same content as the previous successful row: keep its score, record the new size and
                # mtime so that later runs skip the file without reading it.
                unchanged += 1
                row = {k: v for k, v in previous[uri].items() if k in schema.names}
                row.update(size=meta[uri]["size"], mtime=meta[uri]["mtime"])
                pending[uri] = row
                continue
            err = _text(batch["error"][i])
            score = float(batch["score"][i]) if np.isfinite(batch["score"][i]) and not err else None
            row = {
                "image": uri, "score": score,
                "is_anomaly": None if (score is None or threshold is None) else bool(score > threshold),
                "heatmap": _text(batch["heatmap"][i]) if "heatmap" in batch else None, "height": int(batch["height"][i]),
                "width": int(batch["width"][i]), "model": digest, "error": err,
                "digest": _text(batch["digest"][i]), "size": meta[uri]["size"], "mtime": meta[uri]["mtime"],
                "decode_ms": float(batch["decode_ms"][i]), "score_ms": float(batch["score_ms"][i]), "scored_at": now,
            }
            if config.output.patch_scores:
                h, w = int(batch["grid_h"][i]), int(batch["grid_w"][i])
                row.update(grid_h=h, grid_w=w, patch_scores=batch["patch_scores"][i][: h * w].tolist() if h else None)
            pending[uri] = row
            errors += bool(err)
        if len(pending) >= part_rows:
            parts.append(_write_part(output, digest, run, len(parts), list(pending.values()), schema, opts))
            seen.update(pending)
            pending = {}
        if time.time() - last > 5:
            last = time.time()
            log.info("scoring: %d / %d images (%d errors), %.1f images/s", done, len(todo), errors,
                     done / (last - t_start))
    if pending:
        parts.append(_write_part(output, digest, run, len(parts), list(pending.values()), schema, opts))
        seen.update(pending)
    if done != len(todo):
        raise JobError(f"internal error: {done} results for {len(todo)} images; rows written so far are kept")
    compact(parts_before, opts, superseded=seen)
    elapsed = time.time() - t_start
    summary = {"images": len(entries), "scored": len(seen) - unchanged,
               "skipped": len(entries) - len(todo) + unchanged, "rows": len(seen), "errors": errors, "seconds": round(elapsed, 2),
               "images_per_s": round(len(todo) / elapsed, 2), "scores": storage.join(output, "scores", digest),
               "heatmaps": storage.join(output, "heatmaps", digest) if config.output.heatmaps else None,
               "model": digest, "parts": parts, "config": config}
    log.info("score done: %d images (%d scored, %d skipped as unchanged), %d errors, %.1f images/s; scores in %s%s",
             len(entries), summary["scored"], summary["skipped"], errors, summary["images_per_s"], summary["scores"],
             f", heatmaps in {summary['heatmaps']}" if summary["heatmaps"] else "")
    return summary


def read_scores(output: str, opts: dict | None = None, model: str | None = None) -> pa.Table:
    """The score table under <output>/scores/ (all models, or one model's digest)."""
    opts = opts or {}
    root = storage.join(output, "scores", model) if model else storage.join(output, "scores")
    try:
        files = storage.list_files(root, (".parquet",), **opts)
    except FileNotFoundError:
        files = []
    tables = [storage.read_parquet(u, **opts) for u, _ in files]
    return pa.concat_tables(tables, promote_options="default") if tables else SCORE_SCHEMA.empty_table()
