"""score: model + image archive -> score table (Parquet), heatmaps (PNG), on Ray.

    <output>/scores/<model digest>/part-<run>-<seq>.parquet   the score table, one row per image and model
    <output>/heatmaps/<model digest>/<relative path>.png       colour-mapped anomaly map, original resolution
    <output>/heatmaps/<model digest>/<relative path>_overlay.jpg

Steps: :func:`plan_score` (config, model, listing, the incremental plan), :func:`score_dataset`
(Ray: decode tasks -> scoring actors -> render tasks), :func:`write_rows` (the driver writes the
rows as Parquet parts), then the superseded rows are dropped.
"""
from __future__ import annotations

import datetime as _dt
import logging
import time
import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ..artifacts import storage
from ..artifacts.inputs import list_images
from ..artifacts.model import LoadedModel, load_model
from ..artifacts.scores import compact, read_parts, scores_uri, table_schema, write_part
from ..config import Config, load_config
from ..errors import JobError, ModelError
from . import faults
from .cluster import actor_pool, init_ray, iterate_with_progress
from .stages import Score, decode_batch, render_batch

log = logging.getLogger(__name__)


@dataclass
class ScorePlan:
    model_uri: str
    model: LoadedModel
    config: Config              # the run's config: the model's features, the user's runtime / output
    output: str
    entries: list[dict]         # every listed image: uri, rel, size, mtime
    todo: list[dict]            # the images this run reads
    previous: dict              # uri -> the model's previous successful row (incremental runs)
    parts_before: list          # the model's score parts before this run, as (uri, table)
    vrange: tuple[float, float]  # heatmap colour scale
    threshold: float | None     # the model's calibrated decision threshold

    @property
    def digest(self) -> str:
        return self.model.digest


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
    plan = plan_score(model_uri, images, output, config_file, overrides or [], rescore)
    if not plan.todo:
        log.info("score: all %d images already have rows for model %s in %s: nothing to do (no backbone work; "
                 "--rescore all forces it)", len(plan.entries), plan.digest, scores_uri(output, plan.digest))
        return _summary(plan, set(), [], 0, 0, t_start)
    seen, parts, errors, unchanged = write_rows(plan, score_dataset(plan), part_rows)
    compact(plan.parts_before, plan.config.storage.options(), superseded=seen)
    return _summary(plan, seen, parts, errors, unchanged, t_start)


def plan_score(model_uri: str, images: str, output: str, config_file: str | None, overrides: list[str],
               rescore: str) -> ScorePlan:
    """Config and model checked, images listed, the model's score partition compacted and read: which
    images this run must read."""
    pre = load_config(config_file, overrides)  # validates the user's settings before any work
    opts = pre.storage.options()
    try:
        model = load_model(model_uri, opts)
    except ModelError as e:
        raise JobError(f"cannot score: {e}") from None
    config = score_config(model.config, pre, config_file, overrides)
    entries = list_images(images, opts, "images", exclude=output, max_bytes=config.image.max_bytes)
    parts_before, dropped = compact(read_parts(output, model.digest, opts), opts)
    if dropped:
        log.info("removed %d superseded rows left by an interrupted run", dropped)
    previous = {}
    if rescore == "changed":
        previous = {r["image"]: r for _, t in parts_before for r in t.to_pylist() if r["error"] is None}
    todo = [e for e in entries if not (e["uri"] in previous and previous[e["uri"]]["size"] == e["size"]
                                       and previous[e["uri"]]["mtime"] == e["mtime"])]
    log.info("score: %d images under %s with model %s (digest %s, bank %d x %d) -> %s", len(entries), images,
             model_uri, model.digest, *model.bank.shape, output)
    if todo and len(todo) < len(entries):
        log.info("incremental: %d of %d images already scored by this model; scoring %d new or changed",
                 len(entries) - len(todo), len(entries), len(todo))
    return ScorePlan(model_uri, model, config, output, entries, todo, previous, parts_before,
                     _heatmap_range(model, config), model.manifest["stats"].get("threshold"))


def _heatmap_range(model: LoadedModel, config: Config) -> tuple[float, float]:
    """The heatmap colour scale: the model's, unless output.heatmap_min / heatmap_max set it."""
    lo, hi = model.heatmap_range
    vrange = (config.output.heatmap_min if config.output.heatmap_min is not None else lo,
              config.output.heatmap_max or hi)
    if vrange[1] <= vrange[0]:
        raise JobError(f"heatmap scale [{vrange[0]}, {vrange[1]}] is empty: set output.heatmap_max above heatmap_min")
    return vrange


def score_dataset(plan: ScorePlan):
    """The Ray Data pipeline over the images to read: decode tasks -> scoring actors -> render tasks
    (None when the listing refused every file of the run)."""
    config = plan.config
    ray = init_ray(config)
    cfg = config.to_dict()
    pool = actor_pool(config)  # its batch size suits the actors' device
    bs = pool["batch_size"]
    known = {e["uri"]: plan.previous[e["uri"]]["digest"] for e in plan.todo if e["uri"] in plan.previous}
    readable = [{"uri": e["uri"], "rel": e["rel"]} for e in plan.todo if not e["error"]]
    if not readable:  # every row comes from the listing (refused files)
        return None
    ds = ray.data.from_items(readable, override_num_blocks=max(1, min(len(readable), 200)))
    keep_bytes = config.output.heatmaps and config.output.overlay  # the overlay needs the original pixels
    injected = faults.from_env()
    ds = ds.map_batches(decode_batch, fn_kwargs={"config": cfg, "known_uris": known, "keep_bytes": keep_bytes,
                                                 "faults": injected}, batch_size=bs, num_cpus=0.5)
    ds = ds.map_batches(Score, fn_constructor_args=(plan.model_uri, cfg, injected), **pool)
    if config.output.heatmaps:
        ds = ds.map_batches(render_batch, fn_kwargs={"config": cfg, "vrange": plan.vrange, "faults": injected,
                                                     "heatmaps_uri": storage.join(plan.output, "heatmaps", plan.digest)},
                            batch_size=bs, num_cpus=0.5)
    return ds


def write_rows(plan: ScorePlan, ds, part_rows: int) -> tuple[set, list[str], int, int]:
    """One row per image from the dataset's batches (a retried task's repeated rows are dropped),
    written as Parquet parts of ``part_rows``. Returns the images written, the part URIs, and the
    counts of errors and of unchanged images."""
    opts = plan.config.storage.options()
    schema = table_schema(plan.config.output.patch_scores)
    run = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    now = _dt.datetime.now(_dt.timezone.utc)
    meta = {e["uri"]: e for e in plan.todo}
    pending = {e["uri"]: _listing_row(plan, e, now) for e in plan.todo if e["error"]}  # never read
    parts, seen = [], set()
    errors, unchanged = len(pending), 0
    for batch in iterate_with_progress(ds, len(plan.todo), "scoring") if ds is not None else ():
        for i in range(len(batch["uri"])):
            uri = str(batch["uri"][i])
            if uri in seen or uri in pending:
                continue
            row = _row(batch, i, plan, meta[uri], now, schema)
            pending[uri] = row
            unchanged += bool(batch["unchanged"][i])
            errors += bool(row["error"]) and not batch["unchanged"][i]
        if len(pending) >= part_rows:
            parts.append(write_part(plan.output, plan.digest, run, len(parts), list(pending.values()), schema, opts))
            seen.update(pending)
            pending = {}
    if pending:
        parts.append(write_part(plan.output, plan.digest, run, len(parts), list(pending.values()), schema, opts))
        seen.update(pending)
    if len(seen) != len(plan.todo):
        raise JobError(f"internal error: {len(seen)} results for {len(plan.todo)} images; rows written so far are kept")
    return seen, parts, errors, unchanged


def _listing_row(plan: ScorePlan, entry: dict, now) -> dict:
    """The error row of a file the listing refused (a name that cannot be read, over image.max_bytes)."""
    return {"image": entry["uri"], "score": None, "is_anomaly": None, "heatmap": None, "height": 0, "width": 0,
            "model": plan.digest, "error": entry["error"], "warning": None, "digest": None, "size": entry["size"],
            "mtime": entry["mtime"], "decode_ms": 0.0, "score_ms": 0.0, "scored_at": now}


def _row(batch: dict, i: int, plan: ScorePlan, entry: dict, now, schema: pa.Schema) -> dict:
    """The score-table row of image ``i`` of a batch."""
    uri = entry["uri"]
    if batch["unchanged"][i]:
        # Same content as the previous successful row: keep its score, record the new size and
        # mtime so that later runs skip the file without reading it.
        row = {k: v for k, v in plan.previous[uri].items() if k in schema.names}
        row.update(size=entry["size"], mtime=entry["mtime"])
        return row
    err = _text(batch["error"][i])
    score = float(batch["score"][i]) if np.isfinite(batch["score"][i]) and not err else None
    row = {
        "image": uri, "score": score,
        "is_anomaly": None if (score is None or plan.threshold is None) else bool(score > plan.threshold),
        "heatmap": _text(batch["heatmap"][i]) if "heatmap" in batch else None, "height": int(batch["height"][i]),
        "width": int(batch["width"][i]), "model": plan.digest, "error": err,
        "warning": _text(batch["warning"][i]) if "warning" in batch else None,
        "digest": _text(batch["digest"][i]), "size": entry["size"], "mtime": entry["mtime"],
        "decode_ms": float(batch["decode_ms"][i]), "score_ms": float(batch["score_ms"][i]), "scored_at": now,
    }
    if plan.config.output.patch_scores:
        h, w = int(batch["grid_h"][i]), int(batch["grid_w"][i])
        row.update(grid_h=h, grid_w=w, patch_scores=batch["patch_scores"][i][: h * w].tolist() if h else None)
    return row


def _summary(plan: ScorePlan, seen: set, parts: list[str], errors: int, unchanged: int, t_start: float) -> dict:
    """What the run did, logged in one line and returned."""
    elapsed = time.time() - t_start
    config, digest = plan.config, plan.digest
    summary = {"images": len(plan.entries), "scored": len(seen) - unchanged,
               "skipped": len(plan.entries) - len(plan.todo) + unchanged, "rows": len(seen), "errors": errors,
               "seconds": round(elapsed, 2), "images_per_s": round(len(plan.todo) / elapsed, 2) if plan.todo else 0.0,
               "scores": scores_uri(plan.output, digest),
               "heatmaps": storage.join(plan.output, "heatmaps", digest) if config.output.heatmaps else None,
               "model": digest, "parts": parts, "config": config}
    if plan.todo:
        log.info("score done: %d images (%d scored, %d skipped as unchanged), %d errors, %.1f images/s; scores in "
                 "%s%s", summary["images"], summary["scored"], summary["skipped"], errors, summary["images_per_s"],
                 summary["scores"], f", heatmaps in {summary['heatmaps']}" if summary["heatmaps"] else "")
    return summary
