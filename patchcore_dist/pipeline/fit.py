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
from ..artifacts.model import (MANIFEST, ModelWriter, acquire_fit_lease, clean_uncommitted, config_yaml, npy_bytes,
                               release_fit_lease, remove_orphan_shards, reusable_features)
from ..artifacts.runs import error_reasons, new_run_id, now_iso, write_run
from ..config import Config
from ..core import calibration
from ..core.memory_bank import build_index, serialize_index
from ..errors import JobError
from . import faults
from .cluster import actor_pool, check_cluster_paths, init_ray, iterate_with_progress, use_ray
from .local import driver_threads_kept, in_batches, map_ordered, object_columns
from .coreset import build_memory_bank
from .stages import Extract, decode_batch

log = logging.getLogger(__name__)

# Normal images whose anomaly maps fix the heatmap scale (and, without validation images, whose image
# scores centre it).
NORMAL_SAMPLE = 128
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


def run_fit(train: str, model: str, config: Config, reuse: str | None = None, validation: str | None = None) -> dict:
    """Fit a model on the normal images under ``train``; returns its manifest."""
    t_start = time.time()
    run_id, started = new_run_id()
    weights = config.backbone.weights if config.backbone.weights not in ("default", "random") else None
    check_cluster_paths(config, {"--train": train, "--model": model, "--reuse": reuse, "--validation": validation,
                                 "backbone.weights": weights})
    lease = acquire_fit_lease(model, config.storage.options())  # a second fit into `model` is refused
    try:
        plan = plan_fit(train, model, config, reuse, validation)
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
    write_run(model, _fit_record(plan, rows, manifest, run_id, started, elapsed), config.storage.options())
    return manifest


def _fit_record(plan: FitPlan, rows: dict, manifest: dict, run_id: str, started: str, elapsed: float) -> dict:
    """The fit's run record (``<model>/runs/``)."""
    t = manifest["training"]
    return {"run_id": run_id, "job": "fit", "started": started, "ended": now_iso(), "model": manifest["model_digest"],
            "model_uri": plan.model, "inputs": plan.root, "output": plan.model, "images_listed": len(plan.items),
            "scored": t["used"], "skipped": t["reused"], "errors": t["errors"],
            "errors_by_reason": error_reasons([e for e in rows["error"] if e]), "patches": t["patches"],
            "bank_rows": manifest["bank"]["rows"], "threshold": manifest["stats"].get("threshold"),
            "nodes": sorted(plan.nodes),
            "seconds": round(elapsed, 2), "images_per_s": round(len(plan.items) / elapsed, 2), "version": __version__}


def plan_fit(train: str, model: str, config: Config, reuse: str | None, validation: str | None) -> FitPlan:
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
    files = [(e["uri"], e["rel"]) for e in listed]
    held = holdout(files, config.fit.holdout_fraction, config.seed) if not validation else set()
    items = [{"uri": e["uri"], "rel": e["rel"], "split": "validation" if e["uri"] in held else "features",
              "error": e["error"]} for e in listed]
    if validation:
        items += [{"uri": e["uri"], "rel": e["rel"], "split": "validation", "error": e["error"]}
                  for e in list_images(validation, opts, "validation images", exclude=model,
                                       max_bytes=config.image.max_bytes)]
    plan = FitPlan(model, root, items, len(files) - len(held), held, validation=validation, reuse=reuse)
    plan.reusable = reusable_features(reuse, config, opts) if reuse else {}
    clean_uncommitted(model, opts)
    n_val = len(items) - plan.training
    log.info("fit: %d training images under %s%s -> model %s", plan.training, root,
             f", {n_val} validation images" if n_val else "", model)
    return plan


def extract_features(plan: FitPlan, config: Config) -> dict[str, list]:
    """Decode and backbone stages over the plan's readable images, on Ray or in process
    (:func:`~.cluster.use_ray`); the extractor writes the feature shards. Returns the per-image
    columns (:data:`COLUMNS`) in listing order."""
    readable = [{k: it[k] for k in ("uri", "rel", "split")} for it in plan.items if not it["error"]]
    rows = {c: [] for c in COLUMNS}
    if readable:
        batches = (_ray_batches if use_ray(config, len(readable)) else _local_batches)(plan, config, readable)
        for batch in iterate_with_progress(batches, len(readable), "extracting"):
            for c in COLUMNS:
                rows[c].extend(batch[c].tolist())
            plan.nodes.update(str(n) for n in batch.get("node", ()))
    return _with_refused(rows, plan.items)


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
        batches = in_batches(object_columns(readable, ("uri", "rel", "split")),
                             config.runtime.batch_for(pick_device(config.runtime.device).type))
        yield from map_ordered(lambda b: extract(decode_batch(b, cfg, known_digests=known)), batches, config)


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
        pool = actor_pool(config, len(readable))  # its batch size suits the actors' device
        injected = faults.from_env()
        ds = ray.data.from_items(readable, override_num_blocks=max(1, min(len(readable), 200)))
        ds = ds.map_batches(decode_batch, fn_kwargs={"config": cfg, "known_digests": set(plan.reusable),
                                                     "faults": injected},
                            batch_size=pool["batch_size"], num_cpus=0.5)
        ds = ds.map_batches(Extract, fn_constructor_args=(cfg, plan.model, injected), **pool)
        yield from ds.iter_batches(batch_size=None, batch_format="numpy")
    finally:
        context.execution_options.preserve_order = preserve_order


def _with_refused(rows: dict[str, list], items: list[dict]) -> dict[str, list]:
    """The extraction's columns plus a row for every file the listing refused (never read)."""
    for it in items:
        if it["error"]:
            row = {"uri": it["uri"], "rel": it["rel"], "split": it["split"], "digest": "", "height": 0, "width": 0,
                   "error": it["error"], "unchanged": False, "shard": "", "row": -1, "patches": 0,
                   "shard_sha256": "", "shard_bytes": 0}
            for c in COLUMNS:
                rows[c].append(row[c])
    return rows


def commit_model(plan: FitPlan, rows: dict[str, list], config: Config) -> dict:
    """The driver's part: memory bank, index, threshold and tables written; the manifest last."""
    opts = config.storage.options()
    if plan.reusable:
        copy_reused(rows, plan.reusable, plan.model, opts)
    ok = [not e for e in rows["error"]]
    train_ok = [o and s == "features" for o, s in zip(ok, rows["split"])]
    errors = len(ok) - sum(ok)
    if not any(train_ok):
        raise JobError(f"none of the {plan.training + len(plan.held)} training images could be used; first errors: "
                       + "; ".join(f"{r!r}: {e}" for r, e in zip(rows["rel"], rows["error"]) if e)[:800]
                       + " (no model was written)")
    if errors:
        log.warning("%d of %d images could not be used (listed in %s/errors.parquet)", errors, len(ok), plan.model)
    writer = ModelWriter(plan.model, opts)
    for o, split, name, sha, nb in zip(ok, rows["split"], rows["shard"], rows["shard_sha256"], rows["shard_bytes"]):
        if o:
            writer.record(f"{split}/{name}", sha, int(nb))
    remove_orphan_shards(plan.model, set(writer.files), opts)
    shards, counts = _training_shards(rows, train_ok)
    train_uris = [storage.join(plan.model, "features", s) for s in shards]
    bank, stats, selected, layout = build_memory_bank(train_uris, counts, config, opts)
    val_shards = sorted({n for n, o, s in zip(rows["shard"], ok, rows["split"]) if o and s == "validation"})
    stats.update(calibrate([storage.join(plan.model, "validation", s) for s in val_shards], bank, selected, layout,
                           config, opts))
    _write_model_files(writer, bank, rows, ok, config, stats)
    digest = hashlib.sha256("\n".join(sorted(d for d, t in zip(rows["digest"], train_ok) if t)).encode()).hexdigest()
    training = {"uri": plan.root, "images": plan.training, "used": int(sum(train_ok)), "errors": errors,
                "reused": int(sum(rows["unchanged"])), "digest": digest[:16], "patches": stats.pop("patches"),
                "reuse_from": plan.reuse,
                "validation": plan.validation or (f"{len(plan.held)} held out" if plan.held else None)}
    return writer.commit(config, bank.shape, training, stats)


def _training_shards(rows: dict[str, list], train_ok: list[bool]) -> tuple[list[str], list[int]]:
    """The training feature shards in listing order (not by their random names: the coreset's choice
    depends on the patch order) and the patches each holds, from the extraction rows (no shard I/O)."""
    patches: dict[str, int] = {}
    for name, t, p in zip(rows["shard"], train_ok, rows["patches"]):
        if t:
            patches[name] = patches.get(name, 0) + int(p)
    return list(patches), list(patches.values())


def _write_model_files(writer: ModelWriter, bank: np.ndarray, rows: dict[str, list], ok: list[bool],
                       config: Config, stats: dict) -> None:
    """memory_bank.npy, index.faiss, config.yaml, images.parquet and errors.parquet."""
    writer.put("memory_bank.npy", npy_bytes(bank))
    index = build_index(bank, config.index, config.seed)
    stats["index"] = type(index).__name__
    writer.put("index.faiss", serialize_index(index))
    writer.put("config.yaml", config_yaml(config))
    images = pa.table({c: rows[c] for c in COLUMNS if c not in ("shard_sha256", "shard_bytes")})
    writer.put("images.parquet", storage.parquet_bytes(images))
    err_idx = [i for i, o in enumerate(ok) if not o]
    writer.put("errors.parquet", storage.parquet_bytes(pa.table({
        "image": [rows["uri"][i] for i in err_idx], "error": [rows["error"][i] for i in err_idx]},
        schema=pa.schema([("image", pa.string()), ("error", pa.string())]))))


def calibrate(validation_uris: list[str], bank: np.ndarray, selected: np.ndarray, layout: list, config: Config,
              opts: dict) -> dict:
    """The model's decision threshold and heatmap scale from normal images.

    With validation images: the threshold that at most ``fit.target_fpr`` of them exceed, and the
    heatmap scale from them. Without: no threshold; the heatmap scale from a sample of the training
    images, each scored without its own patches in the bank (as if unseen), centred on the 99th
    percentile of their image scores.
    """
    if validation_uris:
        scores, maps = score_normal(validation_uris, bank, config, opts)
        stats = calibration.calibration_stats(scores, config.fit.target_fpr)
        log.info("threshold %.4f from %d normal validation images (target FPR %.3f)", stats["threshold"],
                 stats["validation_images"], config.fit.target_fpr)
        centre, source, of = stats["threshold"], "calibrated threshold", "validation"
    else:
        scores, maps = score_held_out(layout, selected, bank, config, opts)
        stats, of = {}, "training, each without its own patches"
    ref = calibration.normal_reference(scores, maps)
    if not validation_uris:
        centre, source = ref["p99"], "p99 of held-out training image scores (no calibrated threshold)"
    lo, hi = calibration.heatmap_scale(ref["cold"], centre)
    stats.update(normal_image_score={**ref, "images_of": of}, heatmap_min=lo, heatmap_max=hi,
                 heatmap_threshold=centre, heatmap_threshold_source=source)
    log.info("heatmap scale [%.3f, %.3f]: cold = typical normal pixel, centre %.3f = %s", lo, hi, centre, source)
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


def score_held_out(layout: list, selected: np.ndarray, bank: np.ndarray, config: Config, opts: dict
                   ) -> tuple[np.ndarray, list[np.ndarray]]:
    """Image scores and anomaly maps of the first :data:`NORMAL_SAMPLE` training images, each searched
    against the bank without the rows that came from its own patches (a training image scored against
    its own patches would look far more normal than an unseen one); re-weighted as configured."""
    from ..core.memory_bank import MemoryBank, search_excluding
    from ..core.scoring import anomaly_maps, reweighted_image_scores
    index = build_index(bank, config.index.model_copy(update={"type": "flat"}))
    s = config.scoring
    memory = MemoryBank(bank, exact_search="brute") if s.reweight else None
    scores, maps, offset = [], [], 0
    for uri, n_img, per_image in layout:
        if len(scores) >= NORMAL_SAMPLE:
            break
        meta, feats = read_shard(uri, opts, rows=list(range(min(n_img, NORMAL_SAMPLE - len(scores)))))
        grid = (meta["grid_h"][0].as_py(), meta["grid_w"][0].as_py())
        for j, f in enumerate(feats):
            lo = offset + j * per_image
            own = np.flatnonzero((selected >= lo) & (selected < lo + per_image))
            d, idx = search_excluding(index, f.astype(np.float32), own, s.num_neighbors)
            patch = torch.from_numpy(d.mean(1))
            score = patch.max()
            if memory is not None:
                score = reweighted_image_scores(memory, torch.from_numpy(f.astype(np.float32)), patch,
                                                torch.from_numpy(idx[:, 0]), 1, s.reweight_neighbors)[0]
            scores.append(float(score))
            maps.append(anomaly_maps(patch, grid, config.image.crop, s.sigma)[0].numpy())
        offset += n_img * per_image
    return np.asarray(scores), maps
