"""evaluate: model + labelled test set (MVTec AD layout) -> metrics.json and report.html.

The test split is scored by :func:`patchcore_dist.pipeline.score.run_score` (the same Ray stages as
`score`), with the patch-score grids kept (in the grid table beside the score table); anomaly maps
are rebuilt from them at the masks' resolution for the pixel metrics.
"""
from __future__ import annotations

import json
import logging
from collections import defaultdict

import numpy as np
import pyarrow.compute as pc

from ..artifacts import storage
from ..artifacts.inputs import category_entry, category_test, mask_uri
from ..artifacts.scores import read_scores
from ..config import load_config
from ..core import calibration
from ..core.metrics import PixelHistogram, f1_threshold, image_auroc
from ..core.preprocessing import decode_image
from ..core.tiling import anomaly_map_of
from ..errors import ImageError, JobError, StorageError
from .cluster import init_ray, output_batches, use_ray
from .local import in_batches, object_columns
from .score import run_score
from .stages import render_batch

log = logging.getLogger(__name__)


def full_map(row: dict, config, size: tuple[int, int]) -> np.ndarray:
    """The anomaly map of a score-table row at ``size`` (H, W) of its ground-truth mask."""
    return anomaly_map_of(row["patch_scores"], (row["grid_h"], row["grid_w"]), row["height"], row["width"], config,
                          tuple(size))


def run_evaluate(model_uri: str, dataset: str, output: str, config_file: str | None = None,
                 overrides: list[str] | None = None) -> dict:
    """Score the test split of ``dataset`` and write metrics.json and report.html under ``output``
    (relative local paths are taken against the working directory, as the score table's URIs are)."""
    model_uri, dataset, output = (storage.absolute(u) for u in (model_uri, dataset, output))
    user = load_config(config_file, overrides)
    opts = user.storage.options()
    test = category_test(dataset)
    if not storage.is_dir(test, **opts):
        raise JobError(f"{dataset} is not an MVTec AD category: no test/ folder")
    # Every test image is scored again: the score table must hold this model's patch-score grids.
    # The maps are rebuilt with the scoring run's own config (the model's, plus the user's settings).
    # Its heatmaps are drawn again afterwards, over the same keys, on a scale centred on this test
    # set's F1-optimal threshold.
    scored = run_score(model_uri, test, output, config_file, list(overrides or []) + ["output.patch_scores=true"],
                       rescore="all", job="evaluate")
    config, digest = scored["config"], scored["model"]
    prefix = test.rstrip("/") + "/"  # rows of other score runs into the same output are not ours
    ours = read_scores(output, opts, digest, patch_scores=True, where=pc.starts_with(pc.field("image"), pattern=prefix))
    latest = {r["image"]: r for r in ours.to_pylist()}
    rows, groups, errors, warnings = collect_labelled(latest, dataset, config, opts)
    if not rows:
        raise JobError(f"no test image of {dataset} could be scored")
    computed = compute_metrics(rows, groups)
    top = computed.pop("top")
    metrics = {"model": digest, "dataset": dataset, "images": len(latest), "scored": len(rows), **computed,
               "errors": errors, "warnings": warnings, "top": top}
    metrics["heatmap"] = _evaluation_scale(scored, metrics["threshold"], user)
    if user.output.heatmaps and tuple(metrics["heatmap"]["scale"]) != tuple(scored["heatmap_scale"]):
        render_heatmaps(latest, dataset, output, scored, tuple(metrics["heatmap"]["scale"]))
    write_results(metrics, rows, dataset, output, config, opts)
    return metrics


def _evaluation_scale(scored: dict, f1_threshold: float | None, user) -> dict:
    """The heatmap scale of the evaluation: the model's cold end and the F1-optimal threshold at the
    centre (the model's own scale when the test set has one class only or the user fixed the scale)."""
    lo, hi = scored["heatmap_scale"]
    if f1_threshold is None or user.output.heatmap_min is not None or user.output.heatmap_max is not None:
        return {"scale": [lo, hi], "threshold": scored["heatmap_threshold"],
                "threshold_source": scored["heatmap_threshold_source"]}
    lo, hi = calibration.heatmap_scale(lo, f1_threshold)
    return {"scale": [lo, hi], "threshold": f1_threshold, "threshold_source": "F1-optimal threshold of this test set"}


def render_heatmaps(latest: dict, dataset: str, output: str, scored: dict, vrange: tuple[float, float]) -> dict:
    """Heatmap PNGs and overlays of the scored test images drawn again on ``vrange`` (Ray render tasks),
    over the keys the scoring run wrote (so the score table's links stay valid); image URI -> heatmap URI."""
    ok = [r for r in latest.values() if not r["error"]]
    if not ok:
        return {}
    items = [{"uri": r["image"], "rel": category_entry(dataset, r["image"])[0], "error": "", "unchanged": False,
              "score": r["score"], "height": r["height"], "width": r["width"], "grid_h": r["grid_h"],
              "grid_w": r["grid_w"], "patch_scores": np.asarray(r["patch_scores"], np.float32)} for r in ok]
    config = scored["config"].model_copy(update={"output": scored["config"].output.model_copy(update={"heatmaps": True})})
    kwargs = {"config": config.to_dict(), "vrange": vrange, "heatmaps_uri": storage.join(output, "heatmaps", scored["model"]),
              "peak_normalise": scored["peak_normalise"]}
    if use_ray(config, len(items)):
        ds = init_ray(config).data.from_items(items, override_num_blocks=max(1, min(len(items), 64)))
        ds = ds.map_batches(render_batch, fn_kwargs=kwargs, batch_size=8, num_cpus=0.5)
        batches = output_batches(ds)
    else:  # in process, as the scoring run was
        batches = (render_batch(b, **kwargs) for b in in_batches(object_columns(items, items[0]), 8))
    drawn = {}
    for batch in batches:
        for uri, heatmap in zip(batch["uri"], batch["heatmap"]):
            drawn[str(uri)] = heatmap if isinstance(heatmap, str) else None
    return drawn


def collect_labelled(latest: dict, dataset: str, config, opts: dict) -> tuple[list, dict, list, list]:
    """Per test image: label, score and (with its ground-truth mask) the pixel histograms of its anomaly
    map at the mask's resolution; each mask and map is dropped once it is counted, so memory does not
    grow with the test set. Returns the rows, the per-defect groups ("all", "good" and one per defect
    type: labels, scores, pixels), the errors (images in no metric: not scored, or an unusable mask)
    and the warnings."""
    rows, errors, warnings = [], [], []
    usable = [r for r in sorted(latest.values(), key=lambda r: r["image"]) if not r["error"]]
    errors += [{"image": r["image"], "error": r["error"]} for r in latest.values() if r["error"]]
    grids = [r["patch_scores"] for r in usable if r["patch_scores"]]
    lo, hi = (min(map(min, grids)), max(map(max, grids))) if grids else (0.0, 1.0)  # maps lie within
    groups = defaultdict(lambda: {"labels": [], "scores": [], "pixels": PixelHistogram(lo, hi)})
    for r in usable:
        _, defect, name = category_entry(dataset, r["image"])
        label = 0 if defect == "good" else 1
        try:
            mask = np.zeros((r["height"], r["width"]), bool) if label == 0 else _mask(dataset, defect, name, config, opts)
        except (ImageError, StorageError) as e:
            errors.append({"image": r["image"], "error": f"ground-truth mask {mask_uri(dataset, defect, name)}: {e}"})
            continue
        if mask is None:
            warnings.append(f"no ground-truth mask for {r['image']}: left out of the pixel metrics")
        rows.append({"image": r["image"], "defect": defect, "label": label, "score": r["score"],
                     "heatmap": r["heatmap"]})
        pixels = None if mask is None else PixelHistogram(lo, hi).add(mask, full_map(r, config, mask.shape))
        for key in ("all", defect):
            g = groups[key]
            g["labels"].append(label)
            g["scores"].append(r["score"])
            if pixels is not None:
                g["pixels"] = g["pixels"] + pixels
    return rows, groups, sorted(errors, key=lambda e: e["image"]), warnings


def _mask(dataset: str, defect: str, name: str, config, opts: dict) -> np.ndarray | None:
    """A test image's ground-truth mask (pixels > 127 are the defect), None when there is none; read and
    decoded within the image limits (an ImageError says why a mask cannot be used)."""
    uri = mask_uri(dataset, defect, name)
    try:
        data = storage.read_bytes(uri, **opts, limit=config.image.max_bytes + 1)
    except FileNotFoundError:
        return None
    if len(data) > config.image.max_bytes:
        raise ImageError(f"file is over the limit image.max_bytes={config.image.max_bytes}")
    return decode_image(data, config.image.max_pixels, min_side=1)[..., 0] > 127


def compute_metrics(rows: list[dict], groups: dict) -> dict:
    """Image AUROC, pixel AUROC, PRO and the F1-optimal threshold; the same per defect type (each
    against all normal test images); the ten highest-scored images."""
    labels = np.array([r["label"] for r in rows])
    scores = np.array([r["score"] for r in rows])
    allm = groups["all"]
    metrics = {"image_auroc": image_auroc(labels, scores), "pixel_auroc": allm["pixels"].auroc(),
               "pro": allm["pixels"].pro()}
    metrics["threshold"], metrics["f1"] = f1_threshold(labels, scores) if labels.min() != labels.max() else (None, None)
    good = groups.get("good")
    breakdown = {}
    for defect, d in sorted(groups.items()):
        if defect in ("all", "good"):
            continue
        lab = np.r_[good["labels"], d["labels"]] if good else np.array(d["labels"])
        sc = np.r_[good["scores"], d["scores"]] if good else np.array(d["scores"])
        px = good["pixels"] + d["pixels"] if good else d["pixels"]
        breakdown[defect] = {"images": len(d["labels"]), "image_auroc": image_auroc(lab, sc),
                             "pixel_auroc": px.auroc(), "pro": px.pro()}
    metrics["per_defect"] = breakdown
    order = np.argsort(-scores)
    metrics["top"] = [{"image": rows[i]["image"], "score": float(scores[i]), "label": int(labels[i])}
                      for i in order[:10]]
    return metrics


def write_results(metrics: dict, rows: list[dict], dataset: str, output: str, config, opts: dict) -> None:
    """metrics.json and the HTML report under ``output``."""
    from ..render.report import render_report
    storage.write_bytes(storage.join(output, "metrics.json"), json.dumps(_clean(metrics), indent=2).encode(), **opts)
    html = render_report(metrics, rows, dataset, config, opts, output=output)
    storage.write_bytes(storage.join(output, "report.html"), html.encode(), **opts)
    t = metrics["threshold"]
    log.info("evaluate: image AUROC %.3f, pixel AUROC %.3f, PRO %.3f, threshold %s; report %s",
             metrics["image_auroc"], metrics["pixel_auroc"], metrics["pro"], "n/a" if t is None else f"{t:.4g}",
             storage.join(output, "report.html"))


def _clean(x):
    """NaN (a metric undefined for this data, e.g. no normal test images) -> JSON null."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clean(v) for v in x]
    if isinstance(x, float) and np.isnan(x):
        return None
    return x
