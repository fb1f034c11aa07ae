"""fit: normal images -> model directory (memory bank + faiss index + manifest), on Ray.

Workers decode images and extract patch features into Parquet shards under <model>/features/.
The driver streams the shards, projects them on the fly (only the N x projection_dim matrix is
held), runs the greedy coreset, and gathers the full-dimension rows it selected.
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

from . import coreset as coreset_mod
from . import storage
from .cluster import actor_pool, init_ray
from .config import Config
from .features import gather_rows, project_shards
from .memory_bank import MemoryBank, build_index, serialize_index
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


def list_images(uri: str, opts: dict, what: str) -> list[dict]:
    """Image files under ``uri`` (entries: uri, rel, size, mtime); a clear JobError when there are none."""
    try:
        files = storage.list_entries(uri, IMAGE_EXTENSIONS, **opts)
    except FileNotFoundError:
        raise JobError(f"{what} not found: {uri}") from None
    except storage.StorageError as e:
        raise JobError(f"cannot list {what} {uri}: {e}") from None
    if not files:
        raise JobError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {what} {uri}")
    return files


def _table(rows: dict[str, list]) -> pa.Table:
    return pa.table(rows)


MODEL_FILES = ("memory_bank.npy", "index.faiss", "config.yaml", "images.parquet", "errors.parquet")


def _clean_uncommitted(model: str, opts: dict) -> None:
    """A model directory without a manifest is an interrupted fit: its files are never used; remove them.

    Only files of the model layout are removed; a folder holding anything else is refused.
    """
    try:
        leftovers = storage.list_files(model, None, **opts)
    except FileNotFoundError:
        return
    foreign = [r for _, r in leftovers if not (r in MODEL_FILES or (
        r.split("/")[0] in ("features", "validation") and r.endswith(".parquet") and r.count("/") == 1))]
    if foreign:
        raise JobError(f"{model} is not empty and not an interrupted model (it holds e.g. {foreign[0]}): "
                       "write the model to a new, empty URI")
    if leftovers:
        log.warning("%s holds %d files of an interrupted fit (no manifest): removing them", model, len(leftovers))
        for uri, _ in leftovers:
            storage.delete(uri, **opts)


def _reusable(old: str, config: Config, opts: dict) -> dict:
    """digest -> (feature shard URI, row, sha256) of every usable image of a committed model with the same
    features (the sha256 from the old manifest: a reused shard is verified before it is copied)."""
    from .model import ModelError, read_manifest, read_verified
    try:
        manifest = read_manifest(old, opts)
    except ModelError as e:
        raise JobError(f"--reuse: {e}") from None
    if manifest.get("feature_digest") != config.feature_digest():
        raise JobError(f"--reuse: {old} was extracted with other feature settings (backbone, image or embedding); "
                       "its features cannot be reused")
    images = pq.read_table(io.BytesIO(read_verified(old, manifest, "images.parquet", opts))).to_pylist()
    out = {}
    for r in images:
        if not r["error"] and r["shard"]:
            name = f"{r.get('split') or 'features'}/{r['shard']}"
            entry = manifest["files"].get(name)
            if entry is None:
                raise JobError(f"--reuse: {old}/{name} is not listed in its manifest")
            out[r["digest"]] = (storage.join(old, name), int(r["row"]), entry["sha256"])
    return out


def _holdout(entries: list[tuple[str, str]], fraction: float, seed: int) -> set[str]:
    """A deterministic held-out subset (by a seeded hash of the URI, so it is stable as data grows)."""
    if fraction <= 0:
        return set()
    keyed = sorted(entries, key=lambda e: hashlib.sha256(f"{seed}:{e[0]}".encode()).hexdigest())
    n = max(1, int(round(len(entries) * fraction)))
    if n >= len(entries):
        raise JobError(f"fit.holdout_fraction={fraction} leaves no training images of {len(entries)}")
    return {u for u, _ in keyed[:n]}


def run_fit(train: str, model: str, config: Config, reuse: str | None = None, validation: str | None = None) -> dict:
    t_start = time.time()
    opts = config.storage.options()
    if storage.exists(storage.join(model, MANIFEST), **opts):
        raise JobError(f"{model} already holds a committed model; models are never changed in place: "
                       "write the new model to a new URI")
    if reuse and (reuse.rstrip("/") == model.rstrip("/") or reuse.rstrip("/").startswith(model.rstrip("/") + "/")):
        raise JobError("--reuse must name another (committed) model than --model, outside it")
    root = resolve_train_root(train, opts)
    files = [(e["uri"], e["rel"]) for e in list_images(root, opts, "training images")]
    held = _holdout(files, config.fit.holdout_fraction, config.seed) if not validation else set()
    items = [{"uri": u, "rel": r, "split": "validation" if u in held else "features"} for u, r in files]
    if validation:
        items += [{"uri": e["uri"], "rel": e["rel"], "split": "validation"}
                  for e in list_images(validation, opts, "validation images")]
    reusable = _reusable(reuse, config, opts) if reuse else {}
    _clean_uncommitted(model, opts)
    log.info("fit: %d training images under %s%s -> model %s", len(files) - len(held), root,
             f", {len(items) - len(files) + len(held)} validation images" if len(items) > len(files) - len(held) else "",
             model)

    ray = init_ray(config)
    cfg = config.to_dict()
    # Same inputs, same model: keep the listing order through the pipeline, so every run forms the same
    # batches (a backbone's float rounding may depend on the batch) and the coreset sees the patches in
    # the same order (its greedy choice depends on it).
    context = ray.data.DataContext.get_current()
    preserve_order = context.execution_options.preserve_order
    context.execution_options.preserve_order = True
    try:
        pool = actor_pool(config)  # its batch size suits the actors' device
        ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 200)))
        ds = ds.map_batches(decode_batch, fn_kwargs={"config": cfg, "known_digests": set(reusable)},
                            batch_size=pool["batch_size"], num_cpus=0.5)
        ds = ds.map_batches(Extract, fn_constructor_args=(cfg, model), **pool)
        cols = ["uri", "rel", "split", "digest", "height", "width", "error", "unchanged", "shard", "row", "patches",
                "shard_sha256", "shard_bytes"]
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
                log.info("extracting: %d / %d images (%d errors), %.1f images/s", done, len(items), errors,
                         done / (last - t_start))
    finally:
        context.execution_options.preserve_order = preserve_order
    t_extract = time.time() - t_start
    writer = ModelWriter(model, opts)
    if reusable:
        _copy_reused(rows, reusable, model, writer, opts)
    ok = [not e for e in rows["error"]]
    train_ok = [o and s == "features" for o, s in zip(ok, rows["split"])]
    if not any(train_ok):
        raise JobError(f"none of the {len(files)} training images could be used; first errors: "
                       + "; ".join(f"{r}: {e}" for r, e in zip(rows["rel"], rows["error"]) if e)[:800]
                       + " (no model was written)")
    if errors:
        log.warning("%d of %d images could not be used (listed in %s/errors.parquet)", errors, len(items), model)
    for o, split, name, sha, nb in zip(ok, rows["split"], rows["shard"], rows["shard_sha256"], rows["shard_bytes"]):
        if o:
            writer.record(f"{split}/{name}", sha, int(nb))
    patches: dict[str, int] = {}  # training patches per shard, from the extraction rows (no shard I/O)
    for name, t, p in zip(rows["shard"], train_ok, rows["patches"]):
        if t:
            patches[name] = patches.get(name, 0) + int(p)
    shards = list(patches)  # in listing order (dicts keep insertion order), not by the random shard names
    bank, stats = build_memory_bank([storage.join(model, "features", s) for s in shards],
                                    [patches[s] for s in shards], config, opts)
    val_shards = sorted({n for n, o, s in zip(rows["shard"], ok, rows["split"]) if o and s == "validation"})
    if val_shards:
        stats.update(calibrate([storage.join(model, "validation", s) for s in val_shards], bank, config, opts))
    # Write the model; the manifest goes last.
    writer.put("memory_bank.npy", npy_bytes(bank))
    index = build_index(bank, config.index, config.seed)
    stats["index"] = type(index).__name__
    writer.put("index.faiss", serialize_index(index))
    writer.put("config.yaml", config_yaml(config))
    images = pa.table({c: rows[c] for c in cols if c not in ("shard_sha256", "shard_bytes")})
    writer.put("images.parquet", storage.parquet_bytes(images))
    err_idx = [i for i, o in enumerate(ok) if not o]
    writer.put("errors.parquet", storage.parquet_bytes(pa.table({
        "image": [rows["uri"][i] for i in err_idx], "error": [rows["error"][i] for i in err_idx]},
        schema=pa.schema([("image", pa.string()), ("error", pa.string())]))))
    digest = hashlib.sha256("\n".join(sorted(d for d, t in zip(rows["digest"], train_ok) if t)).encode()).hexdigest()
    training = {"uri": root, "images": len(files) - len(held), "used": int(sum(train_ok)), "errors": errors,
                "reused": int(sum(rows["unchanged"])), "digest": digest[:16], "patches": stats.pop("patches"),
                "reuse_from": reuse, "validation": validation or (f"{len(held)} held out" if held else None)}
    manifest = writer.commit(config, bank.shape, training, stats)
    elapsed = time.time() - t_start
    log.info("fit done: %d images (%d errors, %d reused), %d patches -> memory bank %d x %d, extraction %.1f s, "
             "total %.1f s; model %s (digest %s)", len(items), errors, training["reused"], training["patches"],
             bank.shape[0], bank.shape[1], t_extract, elapsed, model, manifest["model_digest"])
    return manifest


def _copy_reused(rows: dict, reusable: dict, model: str, writer: ModelWriter, opts: dict) -> None:
    """Copy the feature rows of unchanged images from the old model's shards into new shards."""
    from .features import ShardError, read_shard, write_shard
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


def calibrate(shard_uris: list[str], bank: np.ndarray, config: Config, opts: dict) -> dict:
    """Decision threshold from normal validation images: at most ``fit.target_fpr`` of them score above it."""
    from .features import read_shard
    from .patchcore import PatchCore
    pc = PatchCore(config, bank, device="cpu")
    scores = []
    for uri in shard_uris:
        meta, feats = read_shard(uri, opts)
        grid = (meta["grid_h"][0].as_py(), meta["grid_w"][0].as_py())
        pred = pc.predict_features(torch.from_numpy(feats.reshape(-1, feats.shape[-1]).astype(np.float32)), grid,
                                   len(feats), maps=False)
        scores.extend(pred.image_scores.tolist())
    v = np.sort(np.asarray(scores))
    allowed = int(np.floor(config.fit.target_fpr * len(v)))
    threshold = float(v[len(v) - allowed - 1])
    log.info("threshold %.4f from %d normal validation images (target FPR %.3f: %d above it)", threshold, len(v),
             config.fit.target_fpr, allowed)
    return {"threshold": threshold, "target_fpr": config.fit.target_fpr, "validation_images": len(v),
            "validation_scores": {"min": float(v[0]), "median": float(np.median(v)), "max": float(v[-1])}}


def _part_coreset(shard_uris: list[str], matrix, k_part: int, seed: int, num_starting_points: int, device: str,
                  opts: dict):
    """First round of the two-round coreset, one Ray task per part: project its shards, greedy k-center."""
    proj, layout = project_shards(shard_uris, None if matrix is None else torch.from_numpy(matrix), opts)
    local = coreset_mod.greedy_coreset(proj, min(k_part, len(proj)), seed, num_starting_points, device)
    return local.numpy(), proj[local].numpy(), layout


def select_coreset(shard_uris: list[str], counts: list[int], config: Config, opts: dict
                   ) -> tuple[np.ndarray, list, dict]:
    """Global indices of the memory bank's patches, the shard layout, and timing facts."""
    c = config.coreset
    t0 = time.time()
    matrix = coreset_mod.projection_matrix(config.embedding.target_dim, c.projection_dim, config.seed)
    n = int(sum(counts))
    k = coreset_mod.coreset_size(n, c.ratio, c.size)
    method = c.method if c.method != "auto" else ("two_round" if n >= c.two_round_min_patches else "single")
    if k >= n:
        method = "all"
    info = {"patches": n, "method": method, "k": k}
    if method == "two_round":
        import ray
        parts = min(len(shard_uris), c.parts or max(1, int(ray.cluster_resources().get("CPU", 1))))
        groups = [list(g) for g in np.array_split(np.arange(len(shard_uris)), parts) if len(g)]
        gpu = c.device != "cpu" and ray.cluster_resources().get("GPU", 0) > 0
        task = ray.remote(num_cpus=1, num_gpus=1 if gpu else 0)(_part_coreset)
        mat = None if matrix is None else matrix.numpy()
        refs = []
        for j, g in enumerate(groups):
            n_part = int(sum(counts[i] for i in g))
            k_part = coreset_mod.part_size(k, n_part, n, c.oversample)
            refs.append(task.remote([shard_uris[i] for i in g], mat, k_part, config.seed + j,
                                    c.num_starting_points, c.device, opts))
        log.info("coreset (two rounds): %d patches in %d parts on Ray, keeping %.1fx their share of k=%d",
                 n, len(groups), c.oversample, k)
        results = ray.get(refs)
        layout, union, pool, offset = [], [], [], 0
        for local, rows, part_layout in results:
            union.append(local + offset)
            pool.append(rows)
            layout.extend(part_layout)
            offset += sum(ni * l for _, ni, l in part_layout)
        union = np.concatenate(union)
        t1 = time.time()
        selected = coreset_mod.second_round(union, torch.from_numpy(np.concatenate(pool)), k, config.seed,
                                            c.num_starting_points, c.device).numpy()
        info.update(parts=len(groups), union=int(len(union)), first_round_s=round(t1 - t0, 3),
                    second_round_s=round(time.time() - t1, 3))
    else:
        projected, layout = project_shards(shard_uris, matrix, opts)
        log.info("coreset: %d patches projected to %d dims in %.1f s; selecting %d (%.2f%%)", n,
                 projected.shape[1], time.time() - t0, k, 100.0 * k / n)
        if method == "all":
            selected = np.arange(n)
        else:
            selected = coreset_mod.greedy_coreset(projected, k, config.seed, c.num_starting_points, c.device).numpy()
        del projected
    info["coreset_seconds"] = round(time.time() - t0, 3)
    return selected, layout, info


def build_memory_bank(shard_uris: list[str], counts: list[int], config: Config, opts: dict
                      ) -> tuple[np.ndarray, dict]:
    """Shards -> coreset (streamed, projected) -> full-dimension memory bank + score statistics."""
    selected, layout, info = select_coreset(shard_uris, counts, config, opts)
    n = info["patches"]
    # A sample of training patches, scored against the bank, fixes the model's score scale.
    rng = np.random.default_rng(config.seed)
    sample = rng.choice(n, size=min(n, 20000), replace=False)
    bank, sample_feats = gather_rows(selected, layout, opts, extra=sample)
    d, _ = MemoryBank.from_config(bank, config).search(sample_feats, 1)
    d = d[:, 0].numpy()
    q = {f"p{p}": float(np.percentile(d, p)) for p in (50, 90, 99, 99.9)}
    # Heatmap colour scale, fixed per model: typical normal patches at the cold end, twice the
    # 99th percentile of normal patch scores at the hot end.
    heatmap_min = q["p50"]
    heatmap_max = max(2.0 * q["p99"], heatmap_min + 1e-6)
    stats = {"patches": int(n), "coreset": {k: v for k, v in info.items() if k != "patches"},
             "train_patch_score": q, "heatmap_min": heatmap_min, "heatmap_max": heatmap_max}
    log.info("coreset (%s) done in %.1f s: %d of %d patches; training patch scores p50 %.3f p99 %.3f; "
             "heatmap scale [%.3f, %.3f]", info["method"], info["coreset_seconds"], len(selected), n, q["p50"],
             q["p99"], heatmap_min, heatmap_max)
    return bank, stats
