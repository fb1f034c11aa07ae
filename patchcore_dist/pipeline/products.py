"""Many products in one job: ``fit --products ROOT --models OUT`` fits one model per product folder
``ROOT/<product>/`` into ``OUT/<product>/<version>/`` and records it in ``OUT/catalog.json``
(:mod:`..artifacts.catalog`); with ``--validation VROOT`` a new version becomes current only if its
image AUROC on ``VROOT/<product>/`` is not below the current version's.

One process runs every product's fit in turn with the single-product functions (:func:`.fit.run_fit`,
:func:`.evaluate.run_evaluate`): one Ray start (``init_ray`` is a no-op once Ray runs) and one
backbone weights cache. Not shared yet: each product's fit builds its own extraction actors / backbone
and runs its coreset after the previous product's (no overlap between products). One product's failure
is logged and listed; the others still fit, and the job ends with an error naming the failed ones.
"""
from __future__ import annotations

import logging
import os

from ..artifacts import catalog, storage
from ..artifacts.inputs import IMAGE_EXTENSIONS
from ..config import load_config
from ..errors import JobError, PatchCoreError
from .fit import run_fit

log = logging.getLogger(__name__)

VALIDATION_RUNS = "_validation"  # OUT/_validation/<product>/<version>/: the promotion's evaluations


def product_folders(root: str, opts: dict) -> list[str]:
    """The product names under ``root``: its sub-folders (locally also empty ones; on S3 the first
    path component of every object). Hidden folders and loose files are not products."""
    if not storage.is_s3(root):
        if not os.path.isdir(root):
            raise JobError(f"--products {root} is not a folder")
        return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith((".", "_")))
    try:
        rels = [r for _, r in storage.list_files(root, None, **opts)]
    except FileNotFoundError:
        raise JobError(f"--products {root}: nothing there") from None
    return sorted({r.split("/", 1)[0] for r in rels if "/" in r and not r.startswith((".", "_"))})


def selected(names: list[str], only: str | None) -> list[str]:
    """``--only a,b``: those products (each must exist under the root), else all."""
    if not only:
        return names
    wanted = [n.strip() for n in only.split(",") if n.strip()]
    missing = [n for n in wanted if n not in names]
    if missing:
        raise JobError(f"--only names products with no folder under --products: {', '.join(missing)} "
                       f"(there are: {', '.join(names) or 'none'})")
    return wanted


def run_fit_products(products: str, models: str, config_file: str | None, overrides: list[str] | None,
                     only: str | None = None, validation: str | None = None, promote: str = "better") -> dict:
    """Fit every (or every ``only``) product; returns {"fitted": {product: entry}, "failed": {product:
    reason}, "catalog": the catalogue}. Raises a JobError after the catalogue is written when any failed."""
    products, models = storage.absolute(products), storage.absolute(models)
    validation = storage.absolute(validation) if validation else None
    config = load_config(config_file, overrides)
    opts = config.storage.options()
    names = [catalog.check_product(n) for n in selected(product_folders(products, opts), only)]
    if not names:
        raise JobError(f"--products {products} holds no product folders")
    fitted, failed = {}, {}
    for name in names:
        try:
            fitted[name] = fit_product(name, products, models, config, validation, promote, config_file, overrides)
        except PatchCoreError as e:
            log.error("product %s: not fitted: %s", name, e)
            failed[name] = str(e)
    result = {"fitted": fitted, "failed": failed, "catalog": catalog.read_catalog(models, opts)}
    if failed:
        raise JobError(f"{len(failed)} of {len(names)} products failed ({', '.join(sorted(failed))}); the others "
                       f"are in {storage.join(models, catalog.CATALOG)}: "
                       + "; ".join(f"{p}: {r}" for p, r in sorted(failed.items()))[:2000])
    return result


def fit_product(name: str, products: str, models: str, config, validation: str | None, promote: str,
                config_file: str | None, overrides: list[str] | None) -> dict:
    """One product: a new version fitted, then promoted (or refused) in the catalogue; its entry."""
    opts = config.storage.options()
    source = storage.join(products, name)
    if not storage.list_files(source, IMAGE_EXTENSIONS, **opts):
        raise JobError(f"no images under {source}")
    version = catalog.new_version()
    uri = storage.join(models, name, version)
    manifest = run_fit(source, uri, config)
    new = catalog.entry(uri, version, manifest)
    current = catalog.current_models(models, opts).get(name)
    check = storage.join(validation, name) if validation else None
    if check and current and storage.is_dir(check, **opts):
        decision = compare(name, new, current, check, models, promote, config_file, overrides)
        new["promotion"] = decision
        if not decision["promoted"]:
            catalog.update_catalog(models, catalog.refuse(name, new), opts)
            log.warning("product %s: new version %s NOT promoted (image AUROC %.4f < current %.4f of %s)", name,
                        version, decision["new_auroc"], decision["current_auroc"], current["version"])
            return new
    elif check and current:
        log.warning("product %s: no validation folder %s: the new version is promoted unchecked", name, check)
    catalog.update_catalog(models, catalog.promote(name, new), opts)
    log.info("product %s: version %s is current (%d images, digest %s)", name, version, new["images"],
             new["digest"])
    return new


def compare(name: str, new: dict, current: dict, check: str, models: str, promote: str,
            config_file: str | None, overrides: list[str] | None) -> dict:
    """Both versions evaluated on ``check`` (an MVTec-layout category): the decision and both numbers."""
    from .evaluate import run_evaluate
    out = storage.join(models, VALIDATION_RUNS, name)
    scores = {}
    for which, e in (("new", new), ("current", current)):
        m = run_evaluate(e["model"], check, storage.join(out, e["version"]), config_file, overrides)
        scores[which] = float(m["image_auroc"])
    promoted = promote == "always" or scores["new"] >= scores["current"]
    decision = {"promoted": promoted, "rule": promote, "validation": check, "new_auroc": scores["new"],
                "current_auroc": scores["current"], "current_version": current["version"]}
    log.info("product %s: image AUROC new %.4f, current %.4f (%s) -> %s", name, scores["new"], scores["current"],
             current["version"], "promoted" if promoted else "refused")
    return decision
