"""The score job's plan: config and model checked, the images listed (a folder) or read (a manifest),
the incremental plan against the score table (:func:`plan_score`), and what a dry run reports
(:func:`dry_run_summary`). Everything here is Arrow tables and numpy arrays on the driver; no Ray."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ..artifacts.inputs import image_table
from ..artifacts.model import LoadedModel, load_model
from ..artifacts.scores import open_tables, previous_rows
from ..config import Config, load_config
from ..errors import JobError, ModelError
from .cluster import check_cluster_paths

log = logging.getLogger(__name__)


@dataclass
class ScorePlan:
    model_uri: str
    model: LoadedModel
    config: Config              # the run's config: the model's features, the user's runtime / output
    output: str
    entries: pa.Table           # every listed image: uri, rel, size, mtime, ctime, etag (sorted by uri)
    todo: pa.Table              # the images this run reads: the same columns, and known_digest (the
                                # digest of this model's previous successful row, null if none)
    vrange: tuple[float, float]  # heatmap colour scale
    threshold: float | None     # the model's calibrated decision threshold
    images: str = ""            # the listed URI (a folder, or a manifest)
    given: int | None = None    # how many URIs the manifest gave (None: a folder was listed)
    first_time: np.ndarray | None = None  # per todo row: no row of this model at all at ``version`` (appended)
    version: int | None = None  # the score table's version the plan read
    product: str | None = None  # score --models: the product these images were routed to

    @property
    def peak_normalise(self) -> bool:
        """Heatmaps peak-normalised: for models whose scale was calibrated on such maps."""
        return "heatmap_threshold" in self.model.manifest["stats"]

    @property
    def heatmap_threshold(self) -> tuple[float | None, str]:
        """The score at the centre of the heatmap scale, and where it comes from."""
        st = self.model.manifest["stats"]
        if "heatmap_threshold" in st:
            return st["heatmap_threshold"], st["heatmap_threshold_source"]
        return None, "none (a model fitted before the scale was centred on a threshold)"

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
    keys = [(s, k) for s in sorted(set(a) | set(b)) for k in sorted(set(a.get(s, {})) | set(b.get(s, {})))]
    diffs = [f"{s}.{k}: model {a.get(s, {}).get(k)!r}, given {b.get(s, {}).get(k)!r}" for s, k in keys
             if a.get(s, {}).get(k) != b.get(s, {}).get(k)]
    if "tiling" in set(a) ^ set(b):
        diffs.insert(0, f"tiling.enabled: model {'tiling' in a}, given {'tiling' in b}")
    return "incompatible config: the model's features were built with other settings (" + "; ".join(diffs) + ")"


def dry_run_summary(plan: ScorePlan, t_start: float) -> dict:
    """What a run would do, from its plan alone: images new (no successful row of this model), changed
    (a row, but the file's statistics differ: read, scored unless its digest is the row's), unchanged
    (not read) and refused (an error row without reading: the listing's or the manifest's reason)."""
    todo = plan.todo
    refused = todo.column("error").is_valid().to_numpy(zero_copy_only=False)
    known = todo.column("known_digest").is_valid().to_numpy(zero_copy_only=False)
    out = {"dry_run": True, "images": plan.entries.num_rows, "new": int((~refused & ~known).sum()),
           "changed": int((~refused & known).sum()), "unchanged": plan.entries.num_rows - todo.num_rows,
           "refused": int(refused.sum()), "given": plan.given, "model": plan.digest, "output": plan.output,
           "seconds": round(time.time() - t_start, 2)}
    log.info("dry run: %d images%s: %d new, %d changed, %d unchanged, %d refused; nothing written to %s",
             out["images"], f" ({plan.given} URIs in the manifest)" if plan.given is not None else "", out["new"],
             out["changed"], out["unchanged"], out["refused"], plan.output)
    return out


def plan_score(model_uri: str, images: str, output: str, config_file: str | None, overrides: list[str],
               rescore: str, images_root: str | None = None, dry_run: bool = False,
               product: str | None = None) -> ScorePlan:
    """Config and model checked, images listed (a folder) or read (a manifest), the score table opened
    (an earlier version's Parquet parts converted; not in a ``dry_run``, which writes nothing): which
    images this run must read."""
    pre = load_config(config_file, overrides)  # validates the user's settings before any work
    opts = pre.storage.options()
    try:
        model = load_model(model_uri, opts)
    except ModelError as e:
        raise JobError(f"cannot score: {e}") from None
    config = score_config(model.config, pre, config_file, overrides)
    weights = config.backbone.weights if config.backbone.weights not in ("default", "random") else None
    check_cluster_paths(config, {"--model": model_uri, "--images": images, "--output": output,
                                 "backbone.weights (of the model)": weights})
    entries, given = image_table(images, opts, "images", exclude=output, max_bytes=config.image.max_bytes,
                                 root=images_root, product=product)
    verify = None
    if "verify" in entries.column_names:  # manifest entries without the statistics that would prove them unchanged
        verify = entries.column("verify").to_numpy(zero_copy_only=False)
        entries = entries.drop_columns(["verify"])
    if not dry_run:
        open_tables(output, opts)
    first_time, version = np.zeros(entries.num_rows, bool), None
    if rescore == "changed":
        prev = previous_rows(output, model.digest, entries, opts, verify)
        unchanged, known, first_time, version = prev.unchanged, prev.known, ~prev.exists, prev.version
    else:
        unchanged, known = np.zeros(entries.num_rows, bool), pa.nulls(entries.num_rows, pa.string())
    todo = entries.append_column("known_digest", known)
    if unchanged.any():  # (a filter copies every column, even when it keeps every row)
        todo = todo.filter(pa.array(~unchanged))
    log.info("score: %d images under %s with model %s (digest %s, bank %d x %d) -> %s", entries.num_rows, images,
             model_uri, model.digest, *model.bank.shape, output)
    if todo.num_rows and todo.num_rows < entries.num_rows:
        log.info("incremental: %d of %d images already scored by this model; reading %d new or changed",
                 entries.num_rows - todo.num_rows, entries.num_rows, todo.num_rows)
    return ScorePlan(model_uri, model, config, output, entries, todo, _heatmap_range(model, config),
                     decision_threshold(model), images, given, first_time[~unchanged], version)


def decision_threshold(model: LoadedModel) -> float | None:
    """The threshold ``is_anomaly`` compares with: the model's calibrated one (every fit calibrates one);
    for models fitted before that, the centre of their heatmap scale (the p99 of held-out training
    image scores); None only for models older than that scale."""
    st = model.manifest["stats"]
    return st["threshold"] if st.get("threshold") is not None else st.get("heatmap_threshold")


def _heatmap_range(model: LoadedModel, config: Config) -> tuple[float, float]:
    """The heatmap colour scale: the model's, unless output.heatmap_min / heatmap_max set it."""
    lo, hi = model.heatmap_range
    vrange = (config.output.heatmap_min if config.output.heatmap_min is not None else lo,
              config.output.heatmap_max or hi)
    if vrange[1] <= vrange[0]:
        raise JobError(f"heatmap scale [{vrange[0]}, {vrange[1]}] is empty: set output.heatmap_max above heatmap_min")
    return vrange
