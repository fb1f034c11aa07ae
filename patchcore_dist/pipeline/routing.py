"""``score --models OUT --images AROOT --output O``: images under ``AROOT/<product>/`` scored with that
product's current model of the catalogue ``OUT/catalog.json``, in one process (one Ray start).

Each catalogued product's folder is one :func:`.score.run_score` over it with ``product`` set: rows stay
in the table's partition of their model's digest (the digest already determines the product, and every
incremental plan reads one model's partition) and carry the product in the ``product`` column.
Incremental per product, as a single score is per model: a product whose current model changed (a
refit, a rollback) has a new digest, so its images are scored again; the others are skipped.

Images under a folder that names no catalogued product get error rows (model ``no-model``, product the
folder's name) saying so; nothing is skipped silently. The job writes one run record with per-product
counts (``products``) and one review page with a section per product.
"""
from __future__ import annotations

import datetime as _dt
import logging
import os
import time

import pyarrow as pa

from .. import __version__
from ..artifacts import catalog, storage
from ..artifacts.inputs import IMAGE_EXTENSIONS, is_manifest, list_images, manifest_products, manifest_table
from ..artifacts.runs import new_run_id, now_iso, write_run
from ..artifacts.scores import commit, open_tables
from ..config import load_config
from ..errors import JobError
from ..render.review import write_product_review
from .products import product_folders
from .score import run_score

log = logging.getLogger(__name__)

NO_MODEL = "no-model"  # the model column (partition) of rows of images no catalogued product's model scores
COUNTS = ("images_listed", "scored", "skipped", "errors")
LOOSE = "(no product)"  # the run record's entry of images in no product folder (or manifest rows without one)


def run_score_products(models: str, images: str, output: str, config_file: str | None = None,
                       overrides: list[str] | None = None, rescore: str = "changed") -> dict:
    """Score every product folder of ``images`` with its current model; returns the run record."""
    models, images, output = (storage.absolute(u) for u in (models, images, output))
    opts = load_config(config_file, overrides).storage.options()
    current = catalog.current_models(models, opts)
    if not current:
        raise JobError(f"no catalogue with products at {storage.join(models, catalog.CATALOG)}: fit one with "
                       "fit --products ROOT --models OUT")
    manifest = is_manifest(images, opts)
    names = manifest_products(images, opts) if manifest else product_folders(images, opts)
    if not names:
        raise JobError(f"--images {images} holds no product folders (AROOT/<product>/...)")
    t0, (run_id, started) = time.time(), new_run_id()
    per, done = {}, []
    for name in names:
        source = images if manifest else storage.join(images, name)
        if name in current:
            s = run_score(current[name]["model"], source, output, config_file, overrides, rescore=rescore,
                          product=name, run_id=run_id)
            per[name] = {"model": s["model"], "version": current[name]["version"],
                         **{k: s["record"][k] for k in COUNTS}}
            done.append((name, s))
        elif name:
            per[name] = unknown_product(name, source, output, models, opts, run_id)
    loose = (_manifest_entries(images, "", output, opts) if "" in names else []) if manifest else loose_images(images)
    if loose:
        where = f"a row of the manifest {images} without a product" if manifest else \
            f"an image directly under {images}"
        per[LOOSE] = error_rows(loose, None, f"{where} belongs to no product: give it one", output, opts, run_id)
    record = {"run_id": run_id, "job": "score", "started": started, "ended": now_iso(), "model": "catalogue",
              "model_uri": models, "inputs": images, "output": output, "products": per,
              **{k: sum(p[k] for p in per.values()) for k in COUNTS},
              "errors_by_reason": _reasons(done, per), "seconds": round(time.time() - t0, 2),
              "version": __version__}
    record["images_per_s"] = round(record["images_listed"] / max(record["seconds"], 1e-9), 2)
    record["run"] = write_run(output, record, opts)
    record["review"] = write_product_review(output, record, [(n, s["record"], s["stats"], s["config"])
                                                             for n, s in done], opts)
    return record


def _reasons(done: list, per: dict) -> dict:
    out: dict[str, int] = {}
    for _, s in done:
        for r, n in s["record"]["errors_by_reason"].items():
            out[r] = out.get(r, 0) + n
    unknown = sum(p["errors"] for n, p in per.items() if p["model"] is None and n != LOOSE)
    if unknown:
        out["no model in the catalogue for the product"] = unknown
    if per.get(LOOSE):
        out["in no product folder"] = per[LOOSE]["errors"]
    return out


def unknown_product(name: str, folder: str, output: str, models: str, opts: dict, run: str) -> dict:
    """Error rows for every image under a folder no catalogued product has; its counts."""
    try:
        listed = _manifest_entries(folder, name, output, opts) if is_manifest(folder, opts) else \
            list_images(folder, opts, f"images of {name}")
    except JobError:
        listed = []
    message = (f"no model in the catalogue {storage.join(models, catalog.CATALOG)} for product {name!r} "
               f"(the folder {folder}): fit it with fit --products ... --only {name}")
    log.error("%d images under %s: %s", len(listed), folder, message)
    return error_rows(listed, name, message, output, opts, run)


def _manifest_entries(manifest: str, product: str, output: str, opts: dict) -> list[dict]:
    """A manifest's rows of ``product`` ("" the rows without one), resolved and checked as a score run
    reads them."""
    return manifest_table(manifest, opts, "images", exclude=output, product=product)[0].to_pylist()


def loose_images(images: str) -> list[dict]:
    """Image files directly under a local AROOT (in no product folder), as listing entries. On S3 they
    are not looked for (that would list the whole archive once more)."""
    if storage.is_s3(images):
        return []
    out = []
    for e in sorted(os.scandir(images), key=lambda e: e.name):
        if e.is_file() and not e.name.startswith(".") and e.name.lower().endswith(IMAGE_EXTENSIONS):
            st = e.stat()
            out.append({"uri": storage.join(images, e.name), "size": st.st_size, "mtime": st.st_mtime,
                        "ctime": st.st_ctime, "etag": None})
    return out


def error_rows(listed: list[dict], product: str | None, message: str, output: str, opts: dict, run: str) -> dict:
    """One error row per listed image (model ``no-model``), committed; the counts for the run record."""
    if listed:
        open_tables(output, opts)
        now = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)
        n = len(listed)
        rows = pa.table({"image": [e["uri"] for e in listed], "error": [message] * n, "model": [NO_MODEL] * n,
                         "product": pa.array([product] * n, pa.string()), "height": pa.array([0] * n, pa.int32()),
                         "width": pa.array([0] * n, pa.int32()), "size": [e["size"] for e in listed],
                         "mtime": [e["mtime"] for e in listed], "ctime": [e["ctime"] for e in listed],
                         "etag": pa.array([e["etag"] for e in listed], pa.string()),
                         "scored_at": pa.array([now] * n, pa.timestamp("s", tz="UTC")), "run": [run] * n,
                         "unchanged": [False] * n})
        commit(output, NO_MODEL, rows, opts, run=run)
    return {"model": None, "version": None, "images_listed": len(listed), "scored": 0, "skipped": 0,
            "errors": len(listed)}


def run_evaluate_products(models: str, dataset: str, output: str, config_file: str | None = None,
                          overrides: list[str] | None = None) -> dict:
    """``evaluate --models OUT --dataset VROOT --output E``: each catalogued product with a folder
    ``VROOT/<product>/`` (MVTec layout) evaluated with its current model into ``E/<product>/``
    (metrics.json, report.html), and ``E/index.html`` with one row per product. Returns product ->
    metrics, or {"error": why} for a product whose evaluation failed or that has no folder."""
    from ..render.report import write_product_index
    from .evaluate import run_evaluate
    models, dataset, output = (storage.absolute(u) for u in (models, dataset, output))
    opts = load_config(config_file, overrides).storage.options()
    current = catalog.current_models(models, opts)
    if not current:
        raise JobError(f"no catalogue with products at {storage.join(models, catalog.CATALOG)}")
    folders = set(product_folders(dataset, opts))
    results = {}
    for name in sorted(current):
        if name not in folders:
            results[name] = {"error": f"no folder {storage.join(dataset, name)}"}
            continue
        try:
            results[name] = run_evaluate(current[name]["model"], storage.join(dataset, name),
                                         storage.join(output, name), config_file, overrides)
        except JobError as e:
            log.error("product %s: not evaluated: %s", name, e)
            results[name] = {"error": str(e)}
    write_product_index(output, results, current, opts)
    return results
