"""fit: normal images -> model directory (memory bank + faiss index + manifest), on Ray.

Three steps: :func:`plan_fit` (checks and listing, before any work), :func:`extract_features`
(Ray: decode tasks and backbone actors write float16 feature shards under <model>/features/), and
:func:`commit_model` (the driver: coreset over the streamed shards, memory bank, index, threshold;
the manifest last).
"""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from .. import __version__
from ..artifacts import storage
from ..artifacts.features import copy_reused, read_shard
from ..artifacts.inputs import holdout, list_images, resolve_train_root
from ..artifacts.lease import acquire_fit_lease, clean_uncommitted, release_fit_lease
from ..artifacts.model import MANIFEST, ModelWriter, config_yaml, npy_bytes, remove_orphan_shards, reusable_features
from ..artifacts.runs import error_reasons, new_run_id, now_iso, write_run
from ..config import Config
from ..core import calibration
from ..core.index import build_index, serialize_index
from ..errors import JobError
from . import faults
from .cluster import (actor_pool, check_cluster_paths, init_ray, iterate_with_progress, output_batches,
                      use_ray)
from .local import driver_threads_kept, in_batches, map_ordered, object_columns, rebatched
from .coreset import build_memory_bank
from .stages import Extract, decode_batch, decode_tiles, read_weights

log = logging.getLogger(__name__)

# Normal images whose anomaly maps fix the heatmap scale (and, without validation images, whose image
# scores centre it).
NORMAL_SAMPLE = 128
MIN_TILED_SAMPLE = 8  # with tiling: training images scored at least (however many tiles they hold)
# Per-image columns of the extraction, kept in images.parquet (but the shard checksums).
COLUMNS = ("uri", "rel", "split", "digest", "height", "width", "error", "unchanged", "shard", "row", "patches",
           "shard_sha256", "shard_bytes")


@dataclass
class FitPlan:
    model: str
    root: str                  # the training folder (train/good of an MVTec category)
    items: list[dict]          # uri, rel, split ("features" or "validation"), in listing order
    training: int              # training images (not held out)
    held: set = field(default_factory=set)
    reusable: dict = field(default_factory=dict)
    reuse: str | None = None
    validation: str | None = None
    nodes: set = field(default_factory=set)  # the Ray nodes whose actors extracted features ("local": in process)
    excluded: list = field(default_factory=list)  # training images --exclude left out (their URIs)


def run_fit(train: str, model: str, config: Config, reuse: str | None = None, validation: str | None = None,
            exclude: str | None = None) -> dict:
    """Fit a model on the normal images under ``train``; returns its manifest. Relative local paths are
    taken against the working directory. ``exclude``: a text file of image URIs (one a line) or a
    Parquet file with an ``image`` column (rows of train_outliers.parquet) to leave out."""
    train, model = storage.absolute(train), storage.absolute(model)
    reuse, validation = (storage.absolute(u) if u else u for u in (reuse, validation))
    t_start = time.time()
    run_id, started = new_run_id()
    weights = config.backbone.weights if config.backbone.weights not in ("default", "random") else None
    check_cluster_paths(config, {"--train": train, "--model": model, "--reuse": reuse, "--validation": validation,
                                 "backbone.weights": weights})
    lease = acquire_fit_lease(model, config.storage.options())  # a second fit into `model` is refused
    try:
        plan = plan_fit(train, model, config, reuse, validation, exclude)
        rows = extract_features(plan, config)
        t_extract = time.time() - t_start
        manifest = commit_model(plan, rows, config)
    finally:
        release_fit_lease(lease, config.storage.options())
    t = manifest["training"]
    elapsed = time.time() - t_start
    log.info("fit done: %d images (%d errors, %d reused), %d patches -> memory bank %d x %d, extraction %.1f s, "
             "total %.1f s; model %s (digest %s)", len(plan.items), t["errors"], t["reused"], t["patches"],
             manifest["bank"]["rows"], manifest["bank"]["dim"], t_extract, elapsed, model, manifest["model_digest"])
    record = _fit_record(plan, rows, manifest, run_id, started, elapsed)
    record["train_outliers"] = manifest["stats"].get("train_outliers", {}).get("top", [])
    record["excluded"] = len(plan.excluded)
    record["run_settings"] = config.run_dict()  # runtime / output / storage: not part of the model
    write_run(model, record, config.storage.options())
    return manifest


def _fit_record(plan: FitPlan, rows: dict, manifest: dict, run_id: str, started: str, elapsed: float) -> dict:
    """The fit's run record (``<model>/runs/``)."""
    t = manifest["training"]
    return {"run_id": run_id, "job": "fit", "started": started, "ended": now_iso(), "model": manifest["model_digest"],
            "model_uri": plan.model, "inputs": plan.root, "output": plan.model, "images_listed": len(plan.items),
            "scored": t["used"], "skipped": t["reused"], "errors": t["errors"],
            "errors_by_reason": error_reasons([e for e, t in zip(rows["error"], rows.get("tile", [0] * len(rows["error"])))
                                               if e and t == 0]), "patches": t["patches"],
            "bank_rows": manifest["bank"]["rows"], "threshold": manifest["stats"].get("threshold"),
            "threshold_images": manifest["stats"].get("threshold_images"), "nodes": sorted(plan.nodes),
            "seconds": round(elapsed, 2), "images_per_s": round(len(plan.items) / elapsed, 2), "version": __version__}


def plan_fit(train: str, model: str, config: Config, reuse: str | None, validation: str | None,
             exclude: str | None = None) -> FitPlan:
    """Everything checked and listed before any work: a new model URI, the images, the hold-out split,
    the features an earlier model can lend; an interrupted fit's leftovers are removed."""
    opts = config.storage.options()
    if storage.exists(storage.join(model, MANIFEST), **opts):
        raise JobError(f"{model} already holds a committed model; models are never changed in place: "
                       "write the new model to a new URI")
    if reuse and (reuse.rstrip("/") == model.rstrip("/") or reuse.rstrip("/").startswith(model.rstrip("/") + "/")):
        raise JobError("--reuse must name another (committed) model than --model, outside it")
    root = resolve_train_root(train, opts)
    listed = list_images(root, opts, "training images", exclude=model, max_bytes=config.image.max_bytes)
    listed, excluded = excluded_images(listed, exclude, opts) if exclude else (listed, [])
    files = [(e["uri"], e["rel"]) for e in listed]
    held = holdout(files, config.fit.holdout_fraction, config.seed) if not validation else set()
    items = [{"uri": e["uri"], "rel": e["rel"], "split": "validation" if e["uri"] in held else "features",
              "error": e["error"]} for e in listed]
    if validation:
        items += [{"uri": e["uri"], "rel": e["rel"], "split": "validation", "error": e["error"]}
                  for e in list_images(validation, opts, "validation images", exclude=model,
                                       max_bytes=config.image.max_bytes)]
    plan = FitPlan(model, root, items, len(files) - len(held), held, validation=validation, reuse=reuse,
                   excluded=excluded)
    plan.reusable = reusable_features(reuse, config, opts) if reuse else {}
    if plan.reusable and config.tiling.enabled:
        log.warning("--reuse: features are extracted again with tiling on (reuse works image by image, "
                    "a tiled image has many feature rows)")
        plan.reusable = {}
    clean_uncommitted(model, opts)
    n_val = len(items) - plan.training
    log.info("fit: %d training images under %s%s -> model %s", plan.training, root,
             f", {n_val} validation images" if n_val else "", model)
    return plan


def read_exclude_list(uri: str, opts: dict) -> list[str]:
    """--exclude: a Parquet file's ``image`` column, or a text file's non-empty lines (# comments)."""
    import io

    import pyarrow.parquet as pq
    try:
        data = storage.read_bytes(storage.absolute(uri), **opts)
    except (OSError, FileNotFoundError) as e:
        raise JobError(f"--exclude {uri}: cannot be read ({e})") from None
    if data[:4] == b"PAR1":
        table = pq.read_table(io.BytesIO(data))
        if "image" not in table.column_names:
            raise JobError(f"--exclude {uri}: a Parquet file needs an 'image' column (as train_outliers.parquet has); "
                           f"it has {', '.join(table.column_names)}")
        return [str(v) for v in table["image"].to_pylist() if v]
    lines = (line.strip() for line in data.decode("utf-8", "replace").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def excluded_images(listed: list[dict], exclude: str, opts: dict) -> tuple[list[dict], list[str]]:
    """The listing without the images --exclude names (by URI as listed, or path relative to the
    training folder), and the URIs left out; names that match no listed image are logged."""
    names = read_exclude_list(exclude, opts)
    wanted = set(names) | {storage.absolute(n) for n in names if "://" not in n}
    kept = [e for e in listed if e["uri"] not in wanted and e["rel"] not in wanted]
    out = [e["uri"] for e in listed if e["uri"] in wanted or e["rel"] in wanted]
    unmatched = len(set(names)) - len(out)
    log.info("--exclude %s: %d training images left out%s", exclude, len(out),
             f" ({unmatched} listed names match no training image)" if unmatched > 0 else "")
    if not kept:
        raise JobError(f"--exclude {exclude} leaves none of the {len(listed)} training images (no model was written)")
    return kept, out


def extract_features(plan: FitPlan, config: Config) -> dict[str, list]:
    """Decode and backbone stages over the plan's readable images, on Ray or in process
    (:func:`~.cluster.use_ray`); the extractor writes the feature shards. Returns the per-image
    columns (:data:`COLUMNS`) in listing order."""
    readable = [{k: it[k] for k in ("uri", "rel", "split")} for it in plan.items if not it["error"]]
    columns = _columns(config)
    rows = {c: [] for c in columns}
    if readable:
        batches = (_ray_batches if use_ray(config, len(readable)) else _local_batches)(plan, config, readable)
        for batch in iterate_with_progress(batches, len(readable), "extracting", count=_images_in):
            for c in columns:
                rows[c].extend(batch[c].tolist())
            plan.nodes.update(str(n) for n in batch.get("node", ()))
    return _with_refused(whole_images(rows) if config.tiling.enabled else rows, plan.items)


def _local_batches(plan: FitPlan, config: Config, readable: list[dict]):
    """The stages of :func:`_ray_batches` in this process (:mod:`.local`), over batches of the actors'
    batch size in listing order (the batches Ray forms with its order preserved)."""
    from ..core.devices import pick_device
    cfg = config.to_dict()
    log.info("extracting in process (%d images, runtime.executor=%s)", len(readable), config.runtime.executor)
    known = set(plan.reusable)
    with driver_threads_kept():
        extract = Extract(cfg, plan.model)
        extract.node = "local"  # in this process, not on a Ray worker
        items = object_columns(readable, ("uri", "rel", "split"))
        bs = config.runtime.batch_for(pick_device(config.runtime.device).type)
        if config.tiling.enabled:  # tiles of one image at a time, extracted in batches of bs tiles as on Ray
            tiles = (decode_tiles(b, cfg) for b in in_batches(items, 1))
            yield from map_ordered(extract, rebatched(tiles, bs), config)
            return
        yield from map_ordered(lambda b: extract(decode_batch(b, cfg, known_digests=known)), in_batches(items, bs),
                               config)


def _ray_batches(plan: FitPlan, config: Config, readable: list[dict]):
    """Ray: decode tasks and a pool of backbone actors (the actors write the shards); output batches."""
    ray = init_ray(config)
    cfg = config.to_dict()
    # Same inputs, same model: keep the listing order through the pipeline, so every run forms the same
    # batches (a backbone's float rounding may depend on the batch) and the coreset sees the patches in
    # the same order (its greedy choice depends on it).
    context = ray.data.DataContext.get_current()
    preserve_order = context.execution_options.preserve_order
    context.execution_options.preserve_order = True
    try:
        pool = actor_pool(config, None if config.tiling.enabled else len(readable))  # batch size for the device
        injected = faults.from_env()
        ds = ray.data.from_items(readable, override_num_blocks=max(1, min(len(readable), 200)))
        if config.tiling.enabled:  # one image per decode task; the actors' batches are tiles
            ds = ds.map_batches(decode_tiles, fn_kwargs={"config": cfg, "faults": injected}, batch_size=1, num_cpus=0.5)
        else:
            ds = ds.map_batches(decode_batch, fn_kwargs={"config": cfg, "known_digests": set(plan.reusable),
                                                         "faults": injected},
                                batch_size=pool["batch_size"], num_cpus=0.5)
        ds = ds.map_batches(Extract, fn_constructor_args=(cfg, plan.model, injected), **pool)
        yield from output_batches(ds)
    finally:
        context.execution_options.preserve_order = preserve_order


def _columns(config: Config) -> tuple[str, ...]:
    """The extraction's per-row columns: per image, or with tiling per tile (its number and count too)."""
    return COLUMNS + (("tile", "tiles") if config.tiling.enabled else ())


def _images_in(batch: dict) -> int:
    """Images a batch of extraction rows completes (with tiling: its images' last tiles)."""
    if "tile" not in batch:
        return len(batch["uri"])
    return int((np.asarray(batch["tile"]) == np.asarray(batch["tiles"]) - 1).sum())


def whole_images(rows: dict[str, list]) -> dict[str, list]:
    """Tile rows: an image with any failed tile is an error on every one of its rows (the image is not
    used, never in part); missing tiles likewise."""
    by_image: dict[str, list[int]] = {}
    for i, uri in enumerate(rows["uri"]):
        by_image.setdefault(uri, []).append(i)
    for idx in by_image.values():
        errors = [(rows["tile"][i], rows["error"][i]) for i in idx if rows["error"][i]]
        tiles = rows["tiles"][idx[0]]
        if not errors and len({rows["tile"][i] for i in idx}) == tiles:
            continue
        why = (f"tile {errors[0][0] + 1} of {tiles} failed: {errors[0][1]}" if tiles > 1 else errors[0][1]) if errors \
            else f"only {len(idx)} of {tiles} tiles were extracted"
        for i in idx:
            rows["error"][i] = why
    return rows


def _with_refused(rows: dict[str, list], items: list[dict]) -> dict[str, list]:
    """The extraction's columns plus a row for every file the listing refused (never read)."""
    for it in items:
        if it["error"]:
            row = {"uri": it["uri"], "rel": it["rel"], "split": it["split"], "digest": "", "height": 0, "width": 0,
                   "error": it["error"], "unchanged": False, "shard": "", "row": -1, "patches": 0,
                   "shard_sha256": "", "shard_bytes": 0, "tile": 0, "tiles": 1}
            for c in rows:
                rows[c].append(row[c])
    return rows


def commit_model(plan: FitPlan, rows: dict[str, list], config: Config) -> dict:
    """The driver's part: memory bank, index, threshold and tables written; the manifest last."""
    opts = config.storage.options()
    if plan.reusable:
        copy_reused(rows, plan.reusable, plan.model, opts)
    ok = [not e for e in rows["error"]]
    train_ok = [o and s == "features" for o, s in zip(ok, rows["split"])]
    first = [t == 0 for t in rows["tile"]] if "tile" in rows else [True] * len(ok)  # one row per image
    errors = sum(1 for o, f in zip(ok, first) if f and not o)
    if not any(train_ok):
        raise JobError(f"none of the {plan.training + len(plan.held)} training images could be used; first errors: "
                       + "; ".join(f"{r!r}: {e}" for r, e in zip(rows["rel"], rows["error"]) if e)[:800]
                       + " (no model was written)")
    if errors:
        log.warning("%d of %d images could not be used (listed in %s/errors.parquet)", errors, sum(first), plan.model)
    writer = ModelWriter(plan.model, opts)
    for o, split, name, sha, nb in zip(ok, rows["split"], rows["shard"], rows["shard_sha256"], rows["shard_bytes"]):
        if o:
            writer.record(f"{split}/{name}", sha, int(nb))
    remove_orphan_shards(plan.model, set(writer.files), opts)
    shards, counts = _training_shards(rows, train_ok)
    train_uris = [storage.join(plan.model, "features", s) for s in shards]
    bank, stats, selected, layout, outliers, memory = build_memory_bank(train_uris, counts, config, opts)
    stats["train_outliers"] = write_outliers(writer, rows, [t and f for t, f in zip(train_ok, first)], layout,
                                             outliers)
    val_shards = sorted({n for n, o, s in zip(rows["shard"], ok, rows["split"]) if o and s == "validation"})
    if config.tiling.enabled:
        stats.update(calibrate_tiled(rows, ok, plan.model, bank, selected, layout, config, opts,
                                     calibration_source(plan)))
    else:
        stats.update(calibrate([storage.join(plan.model, "validation", s) for s in val_shards], bank, selected,
                               layout, config, opts, calibration_source(plan), memory))
    _write_model_files(writer, bank, rows, [o or not f for o, f in zip(ok, first)], config, stats)
    used = [t and f for t, f in zip(train_ok, first)]
    digest = hashlib.sha256("\n".join(sorted(d for d, t in zip(rows["digest"], used) if t)).encode()).hexdigest()
    training = {"uri": plan.root, "images": plan.training, "used": int(sum(used)), "errors": errors,
                "reused": int(sum(rows["unchanged"])), "digest": digest[:16], "patches": stats.pop("patches"),
                "reuse_from": plan.reuse, "excluded": plan.excluded,
                "validation": plan.validation or (f"{len(plan.held)} held out" if plan.held else None)}
    return writer.commit(config, bank.shape, training, stats, backbone_weights(config, opts))


def backbone_weights(config: Config, opts: dict) -> dict | None:
    """The weights file's identity for the manifest (read once more on the driver: scorers refuse other
    content, which would give other features against this bank); None without a weights file."""
    uri = config.backbone.weights
    if uri in ("default", "random"):  # the registry's packaged weights (versioned with their package), none
        return None
    data = read_weights(uri, opts)
    return {"uri": uri, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def _training_shards(rows: dict[str, list], train_ok: list[bool]) -> tuple[list[str], list[int]]:
    """The training feature shards in listing order (not by their random names: the coreset's choice
    depends on the patch order) and the patches each holds, from the extraction rows (no shard I/O)."""
    patches: dict[str, int] = {}
    for name, t, p in zip(rows["shard"], train_ok, rows["patches"]):
        if t:
            patches[name] = patches.get(name, 0) + int(p)
    return list(patches), list(patches.values())


OUTLIERS_NAMED = 5  # training images the summary, the manifest and the run record name


def write_outliers(writer: ModelWriter, rows: dict[str, list], used: list[bool], layout: list,
                   outliers: dict | None) -> dict:
    """train_outliers.parquet: one row per training image (image, outlier_score, dropped_fraction),
    most outlying first (with tiling: no scores, listing order); returns its summary for the manifest."""
    offsets = {uri.rsplit("/", 1)[-1]: int(o) for (uri, _, _), o in
               zip(layout, np.cumsum([0] + [n for _, n, _ in layout]))}
    idx = [i for i, u in enumerate(used) if u]
    at = [offsets[rows["shard"][i]] + int(rows["row"][i]) for i in idx]
    score = outliers["image_score"][at] if outliers else np.full(len(idx), np.nan)
    dropped = outliers["dropped_fraction"][at] if outliers else np.zeros(len(idx))
    order = np.argsort(-score, kind="stable") if outliers else np.arange(len(idx))
    images = [rows["uri"][idx[j]] for j in order]
    writer.put("train_outliers.parquet", storage.parquet_bytes(pa.table(
        {"image": images, "outlier_score": score[order], "dropped_fraction": dropped[order]},
        schema=pa.schema([("image", pa.string()), ("outlier_score", pa.float64()),
                          ("dropped_fraction", pa.float64())]))))
    top = [{"image": images[j], "outlier_score": round(float(score[order][j]), 4)}
           for j in range(min(OUTLIERS_NAMED, len(images)))] if outliers else []
    if top:
        log.info("most outlying training images (review %s/train_outliers.parquet): %s", writer.uri,
                 "; ".join(f"{t['image'].rsplit('/', 1)[-1]} {t['outlier_score']:.3g}" for t in top))
    return {"file": "train_outliers.parquet", "top": top}


def _write_model_files(writer: ModelWriter, bank: np.ndarray, rows: dict[str, list], ok: list[bool],
                       config: Config, stats: dict) -> None:
    """memory_bank.npy, index.faiss, config.yaml, images.parquet and errors.parquet."""
    writer.put("memory_bank.npy", npy_bytes(bank))
    index = build_index(bank, config.index, config.seed)
    stats["index"] = type(index).__name__
    writer.put("index.faiss", serialize_index(index))
    writer.put("config.yaml", config_yaml(config))
    images = pa.table({c: rows[c] for c in rows if c not in ("shard_sha256", "shard_bytes")})
    writer.put("images.parquet", storage.parquet_bytes(images))
    err_idx = [i for i, o in enumerate(ok) if not o]
    writer.put("errors.parquet", storage.parquet_bytes(pa.table({
        "image": [rows["uri"][i] for i in err_idx], "error": [rows["error"][i] for i in err_idx]},
        schema=pa.schema([("image", pa.string()), ("error", pa.string())]))))


def calibrate_tiled(rows: dict[str, list], ok: list[bool], model: str, bank: np.ndarray, selected: np.ndarray,
                    layout: list, config: Config, opts: dict, source: str) -> dict:
    """:func:`calibrate` for a tiled model: each normal image's tiles searched (a training image without
    any patch of its own tiles in the bank), stitched into its image score (not re-weighted); the cold
    end from the stitched grids smoothed at grid resolution (:func:`tiled_normal_scores`)."""
    val = [i for i, o in enumerate(ok) if o and rows["split"][i] == "validation"]
    train = [i for i, o in enumerate(ok) if o and rows["split"][i] == "features"]

    def held_out():
        return tiled_normal_scores(rows, train, model, bank, selected, layout, config, opts)
    if not val:
        return decision_and_scale(*held_out(), HELD_OUT_TRAINING, config)
    scores, maps = tiled_normal_scores(rows, val, model, bank, None, layout, config, opts)
    return decision_and_scale(*pooled(scores, maps, source, held_out), config)


def tiled_normal_scores(rows: dict[str, list], candidates: list[int], model: str, bank: np.ndarray,
                        selected: np.ndarray | None, layout: list, config: Config, opts: dict
                        ) -> tuple[np.ndarray, list[np.ndarray]]:
    """Stitched image scores and smoothed stitched grids of the images among the tile rows
    ``candidates``. Validation images (``selected`` None): all of them. Training images: each searched
    without the bank rows that came from its own tiles, as many as hold :data:`NORMAL_SAMPLE` tiles (at
    least :data:`MIN_TILED_SAMPLE` images): an image of many tiles costs as much search as many untiled
    images."""
    from ..core import tiling
    from ..core.exact_search import excluding_search
    from ..core.scoring import gaussian_blur
    from ..core.tiling import tiling_layout
    offsets = {uri.rsplit("/", 1)[-1]: (int(o), per) for (uri, _, per), o in
               zip(layout, np.cumsum([0] + [n * per for _, n, per in layout]))}
    images: dict[str, list[int]] = {}
    for i in candidates:
        images.setdefault(rows["uri"][i], []).append(i)
    scores, maps, cache, tiles = [], [], {}, 0
    search = excluding_search(bank, config.index.bound_dims, config.index.bound_candidates,
                              precision=config.runtime.search_precision)
    for idx in images.values():
        if selected is not None and tiles >= NORMAL_SAMPLE and len(scores) >= MIN_TILED_SAMPLE:
            break
        tiles += len(idx)
        idx = sorted(idx, key=lambda i: rows["tile"][i])
        own = np.zeros(0, np.int64)
        if selected is not None:
            spans = [(offsets[rows["shard"][i]][0] + rows["row"][i] * offsets[rows["shard"][i]][1],
                      offsets[rows["shard"][i]][1]) for i in idx]
            own = np.flatnonzero(np.any([(selected >= lo) & (selected < lo + n) for lo, n in spans], axis=0))
        grids = []
        for i in idx:
            f = _tile_features(rows, i, model, cache, opts)
            d, _ = search(f, own, config.scoring.num_neighbors)
            grids.append(d.mean(1))
        g = int(round(np.sqrt(len(grids[0]))))
        grids = np.stack([np.asarray(x).reshape(g, g) for x in grids])
        lay = tiling_layout(rows["height"][idx[0]], rows["width"][idx[0]], config)
        stitched = tiling.stitch(lay, grids)
        scores.append(float(stitched.max()))
        if len(maps) < NORMAL_SAMPLE:
            maps.append(gaussian_blur(torch.from_numpy(stitched)[None], config.scoring.sigma / lay.stride)[0].numpy())
    return np.asarray(scores), maps


def _tile_features(rows: dict[str, list], i: int, model: str, cache: dict, opts: dict) -> np.ndarray:
    """Row ``i``'s patch features [h*w, D] float32, from its shard (the last shard read is kept)."""
    name, split = rows["shard"][i], rows["split"][i]
    if cache.get("name") != (split, name):
        cache.update(name=(split, name), feats=read_shard(storage.join(model, split, name), opts)[1])
    return cache["feats"][rows["row"][i]].astype(np.float32)


def calibrate(validation_uris: list[str], bank: np.ndarray, selected: np.ndarray, layout: list, config: Config,
              opts: dict, source: str, memory=None) -> dict:
    """The model's decision threshold and heatmap scale from normal images: the validation images
    (``source`` says which) when there are any (:func:`pooled` with training images when they are
    few), else a sample of the training images, each scored without its own patches in the bank (as
    if unseen; ``memory``: the fit's MemoryBank over ``bank``, whose pruned search is reused)."""
    def held_out():
        return score_held_out(layout, selected, bank, config, opts, memory)
    if not validation_uris:
        return decision_and_scale(*held_out(), HELD_OUT_TRAINING, config)
    scores, maps = score_normal(validation_uris, bank, config, opts)
    return decision_and_scale(*pooled(scores, maps, source, held_out), config)


# Where a threshold comes from, as the manifest and the logs name it.
HELD_OUT_TRAINING = "training images scored without their own patches in the memory bank"


def pooled(scores: np.ndarray, maps: list, source: str, held_out) -> tuple[np.ndarray, list, str]:
    """Validation scores and maps as they are, or, when they are fewer than
    calibration.MIN_THRESHOLD_IMAGES (3 images held out of 30 gave a threshold that was the maximum of
    3 scores), pooled with training images scored as if unseen (``held_out()``), and the source named."""
    if len(scores) >= calibration.MIN_THRESHOLD_IMAGES:
        return scores, maps, source
    more, more_maps = held_out()
    log.info("only %d %s: pooled with %d %s for the threshold", len(scores), source, len(more), HELD_OUT_TRAINING)
    return (np.concatenate([scores, more]), maps + more_maps,
            f"normal images ({len(scores)} {source}, {len(more)} {HELD_OUT_TRAINING})")


def calibration_source(plan: FitPlan) -> str:
    """What the plan's validation split holds: images of --validation, or training images held out."""
    return "validation images from --validation" if plan.validation else \
        "held-out training images from fit.holdout_fraction"


def decision_and_scale(scores: np.ndarray, maps: list[np.ndarray], source: str, config: Config) -> dict:
    """The manifest's statistics from normal image scores and maps: the decision threshold at
    fit.target_fpr (always: every model decides), the normal reference and the heatmap scale centred on
    the threshold. Warns when the threshold rests on too few images."""
    stats = calibration.calibration_stats(scores, config.fit.target_fpr, source)
    line, weak = calibration.describe_threshold(stats)
    (log.warning if weak else log.info)(line)
    ref = calibration.normal_reference(scores, maps)
    lo, hi = calibration.heatmap_scale(ref["cold"], stats["threshold"])
    stats.update(normal_image_score={**ref, "images_of": source}, heatmap_min=lo, heatmap_max=hi,
                 heatmap_threshold=stats["threshold"], heatmap_threshold_source="decision threshold (" + source + ")")
    log.info("heatmap scale [%.4g, %.4g]: cold = typical normal pixel, centre %.4g = the decision threshold", lo, hi,
             stats["threshold"])
    return stats


def score_normal(shard_uris: list[str], bank: np.ndarray, config: Config, opts: dict
                 ) -> tuple[np.ndarray, list[np.ndarray]]:
    """Image scores of every normal image in ``shard_uris`` and the anomaly maps (model resolution) of
    the first :data:`NORMAL_SAMPLE` of them."""
    from ..core.patchcore import PatchCore
    pc = PatchCore(config, bank, device="cpu")
    scores, maps = [], []
    for uri in shard_uris:
        meta, feats = read_shard(uri, opts)
        grid = (meta["grid_h"][0].as_py(), meta["grid_w"][0].as_py())
        pred = pc.predict_features(torch.from_numpy(feats.reshape(-1, feats.shape[-1]).astype(np.float32)), grid,
                                   len(feats), maps=len(maps) < NORMAL_SAMPLE)
        scores.extend(pred.image_scores.tolist())
        if pred.anomaly_maps is not None:
            maps.extend(pred.anomaly_maps[:NORMAL_SAMPLE - len(maps)])
    return np.asarray(scores), maps


def score_held_out(layout: list, selected: np.ndarray, bank: np.ndarray, config: Config, opts: dict,
                   built=None) -> tuple[np.ndarray, list[np.ndarray]]:
    """Image scores and anomaly maps of the first :data:`NORMAL_SAMPLE` training images, each searched
    against the bank without the rows that came from its own patches (a training image scored against
    its own patches would look far more normal than an unseen one); re-weighted as configured."""
    from ..core.exact_search import excluding_search
    from ..core.memory_bank import MemoryBank
    from ..core.scoring import anomaly_maps, reweighted_image_scores
    s = config.scoring
    memory = MemoryBank(bank, exact_search="brute") if s.reweight else None
    search = excluding_search(bank, config.index.bound_dims, config.index.bound_candidates, built,
                              config.runtime.search_precision)
    scores, maps, offset = [], [], 0
    for uri, n_img, per_image in layout:
        if len(scores) >= NORMAL_SAMPLE:
            break
        meta, feats = read_shard(uri, opts, rows=list(range(min(n_img, NORMAL_SAMPLE - len(scores)))))
        grid = (meta["grid_h"][0].as_py(), meta["grid_w"][0].as_py())
        for j, f in enumerate(feats):
            lo = offset + j * per_image
            own = np.flatnonzero((selected >= lo) & (selected < lo + per_image))
            d, idx = search(f.astype(np.float32), own, s.num_neighbors)
            patch = torch.from_numpy(d.mean(1))
            score = patch.max()
            if memory is not None:
                score = reweighted_image_scores(memory, torch.from_numpy(f.astype(np.float32)), patch,
                                                torch.from_numpy(idx[:, 0]), 1, s.reweight_neighbors)[0]
            scores.append(float(score))
            maps.append(anomaly_maps(patch, grid, config.image.crop, s.sigma)[0].numpy())
        offset += n_img * per_image
    return np.asarray(scores), maps
