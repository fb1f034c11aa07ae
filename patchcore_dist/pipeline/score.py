"""score: model + image archive -> score table (Delta Lake), heatmaps (PNG), on Ray.

    <output>/scores/                                           the score table, one row per image and model
    <output>/patch_scores/                                     patch-score grids (output.patch_scores)
    <output>/heatmaps/<model digest>/<relative path>.png       colour-mapped anomaly map, original resolution
    <output>/heatmaps/<model digest>/<relative path>_overlay.jpg
    <output>/review.html                                       the latest score run's review page (render/review.py)

Steps: :func:`.plan.plan_score` (config, model, listing or manifest, the incremental plan, all as
Arrow tables), :func:`score_dataset` (Ray: decode tasks -> scoring actors -> render tasks),
:func:`write_rows` (the driver turns each output batch into Arrow columns and commits them every
``commit_rows`` rows: first-time rows appended when safe, the others merged).
"""
from __future__ import annotations

import datetime as _dt
import logging
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .. import __version__
from ..artifacts import storage
from ..artifacts.runs import error_reasons, new_run_id, now_iso, write_run
from ..artifacts.scores import GRID_SCHEMA, commit, compact_if_due, scores_uri
from ..core import calibration
from ..errors import JobError
from ..render.review import write_review
from . import faults
from .cluster import actor_pool, init_ray, iterate_with_progress, map_in_tasks, output_batches, use_ray
from .local import driver_threads_kept, in_batches, map_ordered, rebatched
from .plan import _heatmap_range  # noqa: F401 (benchmarks/score_job.py)
from .plan import ScorePlan, decision_threshold, dry_run_summary, plan_score, score_config  # noqa: F401 (API)
from .stages import DecodeScoreRender, Score, decode_batch, decode_tiles, render_batch
from .tiles import TileAssembler

log = logging.getLogger(__name__)


LISTING_SCHEMA = storage.LISTING_SCHEMA


def run_score(model_uri: str, images: str, output: str, config_file: str | None = None,
              overrides: list[str] | None = None, rescore: str = "changed", commit_rows: int = 50000,
              job: str = "score", images_root: str | None = None, dry_run: bool = False,
              product: str | None = None, run_id: str | None = None) -> dict:
    """Score every image under ``images`` (a folder, or a Parquet / CSV manifest of image URIs);
    incremental unless ``rescore == "all"``.

    An image is skipped when this model already has a successful row for it with the same size,
    modification time, change time (local files) and ETag (S3), or (checked after reading it) the
    same content digest. Failed images are retried. One row per image and model, always; rows are
    committed in MERGE commits of up to ``commit_rows`` rows (one for most scheduled runs). ``job``
    names the run in its record (``evaluate`` scores a labelled test set: no drift warning there).
    ``images_root``: every image must lie under it (else an error row). ``dry_run``: list and plan
    only, write nothing (:func:`dry_run_summary`). ``product``: the rows' product (score --models, which
    writes the job's one run record and review page itself: none is written here, the record is
    returned as ``record``); ``run_id``: the job's run id, the rows' ``run`` (else this run's own).
    """
    model_uri, images, output = (storage.absolute(u) for u in (model_uri, images, output))
    images_root = storage.absolute(images_root) if images_root else None
    if rescore not in ("changed", "all"):
        raise JobError(f"--rescore must be 'changed' or 'all', got {rescore!r}")
    t_start = time.time()
    own_id, started = new_run_id()
    run_id = run_id or own_id  # score --models: the job's run id, on every product's rows
    plan = plan_score(model_uri, images, output, config_file, overrides or [], rescore, images_root, dry_run, product)
    plan.product = product
    if dry_run:
        return dry_run_summary(plan, t_start)
    if plan.config.output.heatmaps == "anomalies" and plan.threshold is None:
        log.warning("output.heatmaps=anomalies: model %s has no decision threshold (fitted before every fit "
                    "calibrated one): heatmaps are drawn for every image", plan.digest)
    if not plan.todo.num_rows:
        log.info("score: all %d images already have rows for model %s in %s: nothing to do (no backbone work; "
                 "--rescore all forces it)", plan.entries.num_rows, plan.digest, scores_uri(output))
        counts = _counts()
    else:
        counts = write_rows(plan, score_dataset(plan), commit_rows, run_id)
        compact_if_due(output, plan.digest, plan.config.storage.options())
    summary = _summary(plan, counts, t_start)
    record = score_record(plan, summary, counts, run_id, started, job)
    if product:
        return {**summary, "record": record, "stats": plan.model.manifest["stats"]}
    summary["run"] = write_run(output, record, plan.config.storage.options())
    if job != "evaluate":  # evaluate writes its own report
        summary.update(write_review(output, record, plan.model.manifest["stats"], plan.config))
    return summary


def _counts() -> dict:
    """What a run's rows add up to: rows, errors, unchanged images, commits; this run's new scores,
    error messages and anomalies (for the run record)."""
    return {"rows": 0, "errors": 0, "unchanged": 0, "commits": 0, "scores": [], "messages": [], "anomalies": 0,
            "nodes": set()}


def score_dataset(plan: ScorePlan):
    """The output batches of the stages over the images to read (the plan's todo table, each row with
    its index ``idx``): decode -> score -> render, on Ray or in process (:func:`~.cluster.use_ray`);
    None when the listing refused every file of the run."""
    todo = plan.todo.append_column("idx", pa.array(np.arange(plan.todo.num_rows), pa.int64()))
    todo = todo.filter(todo.column("error").is_null())  # files the listing refused are never read
    if not todo.num_rows:
        return None
    return (_ray_dataset if use_ray(plan.config, todo.num_rows) else _local_batches)(plan, todo)


def _render_kwargs(plan: ScorePlan, cfg: dict) -> dict:
    only = plan.threshold if plan.config.output.heatmaps == "anomalies" else None
    return {"config": cfg, "vrange": plan.vrange, "heatmaps_uri": storage.join(plan.output, "heatmaps", plan.digest),
            "peak_normalise": plan.peak_normalise, "only_above": only}


def _local_batches(plan: ScorePlan, todo: pa.Table):
    """The stages of :func:`_ray_dataset` in this process (:mod:`.local`), over batches of the actors'
    batch size."""
    from ..core.devices import pick_device
    config = plan.config
    cfg = config.to_dict()
    log.info("scoring in process (%d images, runtime.executor=%s)", todo.num_rows, config.runtime.executor)
    keep_bytes = config.output.heatmaps and config.output.overlay
    render = _render_kwargs(plan, cfg) if config.output.heatmaps else None
    columns = {name: todo.column(name).to_numpy(zero_copy_only=False) for name in todo.column_names}
    injected = faults.from_env()  # those that raise or stop (use_ray)
    with driver_threads_kept():
        bs = config.runtime.batch_for(pick_device(config.runtime.device).type)
        if config.tiling.enabled:  # tiles of one image at a time, scored in batches of bs tiles as on Ray
            scorer = Score(plan.model_uri, cfg, injected)
            scorer.node = "local"  # in this process, not on a Ray worker
            tiles = (decode_tiles(b, cfg, faults=injected) for b in in_batches(columns, 1))
            yield from map_ordered(scorer, rebatched(tiles, bs), config)
            return
        scorer = DecodeScoreRender(plan.model_uri, cfg, injected, keep_bytes, render)  # as a CPU actor
        scorer.node = "local"
        yield from map_ordered(scorer, in_batches(columns, bs), config)


def _ray_dataset(plan: ScorePlan, todo: pa.Table):
    """The Ray Data pipeline: Arrow blocks of ``todo`` -> decode tasks -> scoring actors -> render tasks
    (GPU actors, tiled runs), or -> CPU actors that decode, score and render."""
    config = plan.config
    ray = init_ray(config)
    cfg = config.to_dict()
    # CPU actors decode, score and render each batch themselves (untiled runs); GPU actors are fed
    # by decode tasks and feed render tasks
    pool = actor_pool(config, None if config.tiling.enabled else todo.num_rows)
    fused = not config.tiling.enabled and "num_gpus" not in pool
    bs = pool["batch_size"]
    step = -(-todo.num_rows // max(1, min(todo.num_rows, 200)))
    ds = ray.data.from_arrow([todo.slice(i, step) for i in range(0, todo.num_rows, step)])
    keep_bytes = config.output.heatmaps and config.output.overlay  # the overlay needs the original pixels
    injected = faults.from_env()
    if config.tiling.enabled:  # one image per decode task; the actors' batches are tiles
        ds = ds.map_batches(decode_tiles, fn_kwargs={"config": cfg, "faults": injected}, batch_size=1, num_cpus=0.5)
        return ds.map_batches(Score, fn_constructor_args=(plan.model_uri, cfg, injected), **pool)
    if fused:
        log.info("CPU actors decode, score and render each batch")
        render = _render_kwargs(plan, cfg) if config.output.heatmaps else None
        return ds.map_batches(DecodeScoreRender, fn_constructor_args=(plan.model_uri, cfg, injected, keep_bytes, render),
                              **pool)
    ds = ds.map_batches(decode_batch, fn_kwargs={"config": cfg, "keep_bytes": keep_bytes, "faults": injected},
                        batch_size=bs, num_cpus=0.5)
    ds = ds.map_batches(Score, fn_constructor_args=(plan.model_uri, cfg, injected), **pool)
    if config.output.heatmaps:
        ds = ds.map_batches(render_batch, fn_kwargs={**_render_kwargs(plan, cfg), "faults": injected},
                            batch_size=bs, num_cpus=0.5)
    return ds


def scored_batches(plan: ScorePlan, ds):
    """The image rows of the stages' output batches (a Ray dataset, or the in-process batches), with
    progress. With tiling on, the tile rows are stitched into image rows on the driver
    (:class:`.tiles.TileAssembler`) and their heatmaps drawn then: by Ray tasks, at most a few at a
    time, or in process."""
    total = plan.todo.num_rows
    if not plan.config.tiling.enabled:
        yield from iterate_with_progress(ds, total, "scoring")
        return
    assembler = TileAssembler(plan.config)
    on_ray = hasattr(ds, "iter_batches")
    images = (b for b in map(assembler.add, output_batches(ds)) if b is not None)
    if plan.config.output.heatmaps:
        kwargs = {**_render_kwargs(plan, plan.config.to_dict()), "faults": faults.from_env()}
        images = map_in_tasks(images, render_batch, kwargs, num_cpus=0.5) if on_ray else \
            (render_batch(b, **kwargs) for b in images)
    yield from iterate_with_progress(images, total, "scoring")
    if assembler.incomplete:
        raise JobError(f"internal error: {assembler.incomplete} images are missing tiles; the rows committed so far "
                       "are kept, run the job again to complete it")


def write_rows(plan: ScorePlan, ds, commit_rows: int, run: str) -> dict:
    """One row per image from the dataset's batches (a retried task's repeated rows are dropped),
    as Arrow tables, committed to the score table every ``commit_rows`` rows, each row's ``run`` the
    run record's id. Returns the counts of rows, errors, unchanged images and commits."""
    opts = plan.config.storage.options()
    now = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)
    seen = np.zeros(plan.todo.num_rows, bool)
    pending: list[tuple[pa.Table, pa.Table | None]] = []
    counts = _counts()

    def flush():
        rows = pa.concat_tables([r for r, _ in pending])
        grids = [g for _, g in pending if g is not None]
        commit(plan.output, plan.digest, rows, opts, pa.concat_tables(grids) if grids else None, plan.version, run)
        counts["commits"] += 1
        pending.clear()
    for batch in _with_refused(plan, scored_batches(plan, ds) if ds else ()):
        idx = np.asarray(batch["idx"], np.int64)
        _, first = np.unique(idx, return_index=True)
        keep = np.sort(first[~seen[idx[first]]])
        if not len(keep):
            continue
        seen[idx[keep]] = True
        rows, grids = batch_tables(batch, keep, plan, run, now)
        if plan.first_time is not None:  # appended, not merged, when safe (artifacts.scores.commit)
            rows = rows.append_column("first_time", pa.array(plan.first_time[idx[keep]]))
        pending.append((rows, grids))
        unchanged = rows.column("unchanged").to_numpy(zero_copy_only=False)
        counts["rows"] += rows.num_rows
        counts["unchanged"] += int(unchanged.sum())
        counts["errors"] += int((rows.column("error").is_valid().to_numpy(zero_copy_only=False) & ~unchanged).sum())
        _tally(counts, rows, unchanged)
        counts["nodes"].update(str(x) for x in batch.get("node", ()))
        if sum(r.num_rows for r, _ in pending) >= commit_rows:
            flush()
    if pending:
        flush()
    if not seen.all():
        raise JobError(f"internal error: {int(seen.sum())} results for {len(seen)} images; the rows committed so far "
                       "are kept, run the job again to complete it")
    return counts


def _with_refused(plan: ScorePlan, batches):
    """The files the listing refused (a name that cannot be read, over image.max_bytes) as one batch of
    error rows (they are never read), then the dataset's batches."""
    refused = np.flatnonzero(plan.todo.column("error").is_valid().to_numpy(zero_copy_only=False))
    if len(refused):
        t = plan.todo.take(pa.array(refused))
        n = len(refused)
        yield {"idx": refused, "uri": np.array(t.column("uri").to_pylist(), object),
               "error": np.array(t.column("error").to_pylist(), object), "score": np.full(n, np.nan),
               "unchanged": np.zeros(n, bool), "height": np.zeros(n, np.int32), "width": np.zeros(n, np.int32),
               "digest": np.array([""] * n, object), "size": t.column("size").to_numpy(zero_copy_only=False),
               "mtime": t.column("mtime").to_numpy(zero_copy_only=False),
               "ctime": t.column("ctime").to_numpy(zero_copy_only=False),
               "etag": np.array(t.column("etag").to_pylist(), object), "decode_ms": np.zeros(n, np.float32),
               "score_ms": np.zeros(n, np.float32), "grid_h": np.zeros(n, np.int32), "grid_w": np.zeros(n, np.int32),
               "patch_scores": np.zeros((n, 1), np.float32)}
    yield from batches


def _tally(counts: dict, rows: pa.Table, unchanged: np.ndarray) -> None:
    """Add this batch's new scores, error messages and anomalies to ``counts``."""
    fresh = rows.filter(pa.array(~unchanged))
    counts["messages"].extend(e for e in fresh.column("error").to_pylist() if e)
    scored = fresh.filter(fresh.column("score").is_valid())
    counts["scores"].extend(scored.column("score").to_pylist())
    counts["anomalies"] += int(pc.sum(pc.fill_null(scored.column("is_anomaly"), False)).as_py() or 0)


def _strings(values) -> pa.Array:
    """A string column of a Ray batch as Arrow: empty strings and missing values are null (an
    all-null column comes back from Ray as NaN floats)."""
    values = np.asarray(values)
    if values.dtype.kind == "f":
        return pa.nulls(len(values), pa.string())
    arr = pa.array(values, pa.string(), from_pandas=True)
    return pc.if_else(pc.equal(arr, ""), pa.scalar(None, pa.string()), arr)


def _not_finite(err: pa.Array, score: np.ndarray, unchanged: np.ndarray) -> pa.Array:
    """``err`` with an error for each scored row whose score is NaN or infinite (the next run retries it)."""
    bad = ~np.isfinite(score) & ~unchanged & ~err.is_valid().to_numpy(zero_copy_only=False)
    if not bad.any():
        return err
    return pa.array([f"score is not finite ({score[i]})" if bad[i] else e for i, e in enumerate(err.to_pylist())],
                    pa.string())


def batch_tables(batch: dict, keep: np.ndarray, plan: ScorePlan, run: str, now) -> tuple[pa.Table, pa.Table | None]:
    """The score rows (SCORE_SCHEMA plus ``unchanged``) of the rows ``keep`` of an output batch, and
    their patch-score grids (GRID_SCHEMA) when output.patch_scores is on. Column by column."""
    b = {k: np.asarray(v)[keep] for k, v in batch.items() if k not in ("patch_scores", "crop", "data")}
    n = len(keep)
    unchanged = b["unchanged"].astype(bool)
    err = _not_finite(_strings(b["error"]), b["score"].astype(np.float64), unchanged)
    ok = np.isfinite(b["score"].astype(np.float64)) & ~err.is_valid().to_numpy(zero_copy_only=False)
    score = pa.array(b["score"].astype(np.float64), mask=~ok)
    if plan.threshold is None:
        anomaly, normalized = pa.nulls(n, pa.bool_()), pa.nulls(n, pa.float64())
    else:
        anomaly = pa.array(b["score"] > plan.threshold, mask=~ok)
        cold = plan.model.manifest["stats"]["heatmap_min"]
        normalized = pa.array(calibration.normalized_scores(b["score"], plan.threshold, cold), mask=~ok)
    rows = pa.table({
        "image": pa.array(b["uri"], pa.string()), "score": score, "normalized_score": normalized,
        "is_anomaly": anomaly,
        "heatmap": _strings(b["heatmap"]) if "heatmap" in b else pa.nulls(n, pa.string()),
        "height": pa.array(b["height"], pa.int32()), "width": pa.array(b["width"], pa.int32()),
        "model": pa.array([plan.digest] * n, pa.string()), "error": err,
        "warning": _strings(b["warning"]) if "warning" in b else pa.nulls(n, pa.string()), "digest": _strings(b["digest"]),
        "size": pa.array(b["size"], pa.int64(), from_pandas=True), "mtime": pa.array(b["mtime"], pa.float64(), from_pandas=True),
        "ctime": pa.array(b["ctime"], pa.float64(), from_pandas=True), "etag": _strings(b["etag"]),
        "decode_ms": pa.array(b["decode_ms"], pa.float32()), "score_ms": pa.array(b["score_ms"], pa.float32()),
        "scored_at": pa.array(np.full(n, now), pa.timestamp("s", tz="UTC")), "run": pa.array([run] * n, pa.string()),
        "product": pa.array([plan.product] * n, pa.string()), "unchanged": pa.array(unchanged, pa.bool_())})
    grids = None
    if plan.config.output.patch_scores:
        sel = np.flatnonzero(ok & ~unchanged & (b["grid_h"] > 0))
        grids = _grids(batch["patch_scores"], keep[sel], b["grid_h"][sel], b["grid_w"][sel], rows.take(sel))
    return rows, grids


def _grids(patch_scores, rows_idx: np.ndarray, gh: np.ndarray, gw: np.ndarray, rows: pa.Table) -> pa.Table:
    """The GRID_SCHEMA table of ``rows``: their grids cut to grid_h x grid_w values."""
    ps, cells = np.asarray(patch_scores), gh.astype(np.int64) * gw
    if ps.ndim == 2 and ps.dtype != object and np.all(cells == ps.shape[1]):  # one grid size: no per-row work
        flat = ps[rows_idx].astype(np.float32).ravel()
    else:
        flat = np.concatenate([np.asarray(ps[i], np.float32)[:c] for i, c in zip(rows_idx, cells)] or [np.zeros(0)])
    offsets = np.concatenate([[0], np.cumsum(cells)]).astype(np.int32)
    return pa.table({"image": rows.column("image"), "model": rows.column("model"), "run": rows.column("run"),
                     "scored_at": rows.column("scored_at"), "grid_h": pa.array(gh, pa.int32()),
                     "grid_w": pa.array(gw, pa.int32()),
                     "patch_scores": pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat.astype(np.float32)))},
                    schema=GRID_SCHEMA)


def _summary(plan: ScorePlan, counts: dict, t_start: float) -> dict:
    """What the run did, logged in one line and returned: the listed images are the scored ones (a new
    score), the skipped ones (unchanged) and the errors."""
    elapsed = time.time() - t_start
    config, digest = plan.config, plan.digest
    n, todo = plan.entries.num_rows, plan.todo.num_rows
    summary = {"images": n, "scored": counts["rows"] - counts["unchanged"] - counts["errors"],
               "skipped": n - todo + counts["unchanged"], "rows": counts["rows"], "errors": counts["errors"],
               "commits": counts["commits"], "seconds": round(elapsed, 2),
               "images_per_s": round(todo / elapsed, 2) if todo else 0.0, "scores": scores_uri(plan.output),
               "heatmaps": storage.join(plan.output, "heatmaps", digest) if config.output.heatmaps else None,
               "model": digest, "config": config, "heatmap_scale": plan.vrange,
               "heatmap_threshold": plan.heatmap_threshold[0], "heatmap_threshold_source": plan.heatmap_threshold[1],
               "peak_normalise": plan.peak_normalise}
    if todo:
        log.info("score done: %d images: %d scored, %d skipped as unchanged, %d errors; %.1f images/s, %d commits; "
                 "scores in %s%s", n, summary["scored"], summary["skipped"], counts["errors"], summary["images_per_s"],
                 counts["commits"], summary["scores"], f", heatmaps in {summary['heatmaps']}" if summary["heatmaps"] else "")
    return summary


def score_record(plan: ScorePlan, summary: dict, counts: dict, run_id: str, started: str, job: str) -> dict:
    """The run record (``<output>/runs/``): counts, errors by reason, anomaly rate, score quantiles, drift."""
    scores = np.asarray(counts["scores"], dtype=np.float64)
    ref = plan.model.manifest["stats"].get("normal_image_score") or {}
    reference = ref.get("p99")
    drift = (calibration.drift(scores, reference, ref["images"], ref.get("above_p99", 0))
             if reference is not None else None)
    if drift and drift["warning"] and job == "score":
        log.warning("drift: %.1f%% of this run's %d images score above the model's normal p99 image score %.4g "
                    "(normal images: about %.1f%%); the line or the camera may have changed, or the model is stale",
                    100 * drift["share_above"], len(scores), reference, 100 * drift["expected"])
    calibrated = plan.threshold is not None
    return {"run_id": run_id, "job": job, "started": started, "ended": now_iso(), "model": plan.digest,
            "model_uri": plan.model_uri, "inputs": plan.images, "manifest_uris": plan.given, "output": plan.output,
            "images_listed": summary["images"], "scored": summary["scored"], "skipped": summary["skipped"],
            "errors": summary["errors"], "errors_by_reason": error_reasons(counts["messages"]),
            "threshold": plan.threshold, "anomalies": counts["anomalies"] if calibrated else None,
            "anomaly_rate": (counts["anomalies"] / len(scores) if len(scores) else 0.0) if calibrated else None,
            "score_quantiles": calibration.quantiles(scores), "drift": drift, "seconds": summary["seconds"],
            "images_per_s": summary["images_per_s"], "nodes": sorted(counts["nodes"]), "version": __version__}
