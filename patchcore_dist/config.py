"""Job configuration: YAML files with typed validation and dotted command-line overrides.

One pydantic model per config section; unknown keys, wrong types and impossible values
raise :class:`ConfigError` before any work starts.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
from pathlib import Path
from typing import Annotated, Any, Literal, Optional
from urllib.parse import urlparse

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, Strict, ValidationError, field_validator,
                      model_validator)

from .errors import ConfigError

log = logging.getLogger(__name__)

# The embedded default config, shipped inside the package (configs/ at the top of the checkout links to it).
CONFIGS = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = CONFIGS / "default.yaml"


def _not_bool(v):
    if isinstance(v, bool):
        raise ValueError("a boolean is not a number")
    return v


# Integers are strict (true / false / 2.5 / "8" are refused, not read as 1 / 0 / 2 / 8); real numbers
# take ints and YAML's "1e-3" strings but not booleans; infinity and NaN are refused everywhere.
Int = Annotated[int, Strict()]
Real = Annotated[float, BeforeValidator(_not_bool)]

# Upper bounds of settings whose work or memory grows with them: far above any useful value, below
# the values that would exhaust a machine later in the job.
MAX_SEED = 2 ** 30          # faiss takes 32-bit seeds; the two-round coreset seeds part j with seed + j
MAX_RESIZE = 4096           # model input side: activations grow with its square
MAX_BANK = 20_000_000       # memory-bank rows: 80 GB of float32 at D = 1024, above any bank in the capacity plan
MAX_PIXELS = 1_000_000_000  # decoding and rendering take ~44 bytes per pixel
MAX_BATCH = 4096
MAX_WORKING = 32768         # tiling.working_size: a 32k-pixel side, far above any camera


# What defines a model (its config digest, model digest and config.yaml): these sections, with their
# values. Everything else says where and how a job runs or what it writes (RUN_SECTIONS) and never
# enters a model's identity: a fit with runtime.gpu_batch_size=128 is the same model as without.
IDENTITY_SECTIONS = ("backbone", "image", "embedding", "coreset", "scoring", "index", "fit", "tiling", "seed")
# The run sections as models have always recorded them (their defaults when identities were first
# pinned): recorded as these constants, whatever this run's values and whatever keys or defaults they
# gain later, so the digests of models fitted with the defaults never move.
RUN_SECTIONS_AS_RECORDED = {
    "runtime": {"device": "auto", "batch_size": 8, "gpu_batch_size": 64, "num_actors": None, "actor_cpus": 1.0,
                "precision": "fp32", "optimize_backbone": True, "search_precision": "fp32", "torch_threads": None,
                "ray_num_cpus": None},
    "output": {"heatmaps": True, "overlay": True, "heatmap_min": None, "heatmap_max": None, "patch_scores": False},
    "storage": {"endpoint_url": None, "region": None},
}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False, validate_assignment=True, allow_inf_nan=False)


class BackboneConfig(_Section):
    name: str = "tf_efficientnet_lite0"
    # Levels (module names) whose feature maps make the patch features. None: the registry's default.
    layers: Optional[list[str]] = None
    # Weights source: "default" (the registry's offline source, if it has one), a path / URI to a
    # state-dict file, or "random" (tests and speed benchmarks only).
    weights: str = "default"

    @field_validator("layers")
    @classmethod
    def _layers(cls, v):
        if v is not None and len(v) == 0:
            raise ValueError("backbone.layers must name at least one level")
        return v


class ImageConfig(_Section):
    resize: Int = Field(256, gt=0, le=MAX_RESIZE, description="shorter side after resizing, pixels")
    crop: Int = Field(224, gt=0, description="side of the centre crop fed to the backbone")
    max_pixels: Int = Field(100_000_000, gt=0, le=MAX_PIXELS,
                            description="larger images are refused (decompression bombs); the only pixel limit")
    max_bytes: Int = Field(512 * 2 ** 20, gt=0, description="larger files are refused from the listing's size, "
                                                             "without being read")
    min_side: Int = Field(16, gt=0, description="smaller images are refused")

    @model_validator(mode="after")
    def _crop_fits(self):
        if self.crop > self.resize:
            raise ValueError(f"image.crop ({self.crop}) must not exceed image.resize ({self.resize})")
        return self


class EmbeddingConfig(_Section):
    patch_size: Int = Field(3, gt=0, description="local neighbourhood aggregated into each patch feature")
    pretrain_dim: Int = Field(1024, gt=0, le=65536)
    target_dim: Int = Field(1024, gt=0, le=65536)

    @field_validator("patch_size")
    @classmethod
    def _odd(cls, v):
        if v % 2 != 1:
            raise ValueError("embedding.patch_size must be odd (the neighbourhood is centred)")
        return v


class CoresetConfig(_Section):
    ratio: Real = Field(0.1, gt=0.0, le=1.0, description="fraction of patches kept in the memory bank")
    size: Optional[Int] = Field(None, gt=0, description="absolute memory-bank size; overrides ratio")
    projection_dim: Int = Field(128, gt=0, le=65536, description="Johnson-Lindenstrauss dimension for the selection")
    num_starting_points: Int = Field(10, gt=0, le=100_000)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # single: one greedy pass on the driver; two_round: greedy per part in parallel Ray tasks, then
    # greedy over the union (composable coreset); auto: two_round from two_round_min_patches patches.
    method: Literal["auto", "single", "two_round"] = "auto"
    two_round_min_patches: Int = Field(5_000_000, gt=0)
    parts: Optional[Int] = Field(None, gt=0, le=100_000, description="two_round: number of parts; None: CPUs of the cluster")
    oversample: Real = Field(2.0, gt=0.0, le=100.0,
                             description="two_round: each part keeps oversample x its share of k")

    @field_validator("size")
    @classmethod
    def _realistic(cls, v):
        if v is not None and v > MAX_BANK:
            raise ValueError(f"coreset.size={v} is larger than any realistic memory bank (at most {MAX_BANK} rows, "
                             "80 GB of float32 at D = 1024): use coreset.ratio or a smaller size")
        return v


class ScoringConfig(_Section):
    num_neighbors: Int = Field(1, gt=0, le=1024, description="patch score = mean distance to the k nearest")
    reweight: bool = Field(False, description="the paper's softmax re-weighting of the image score")
    reweight_neighbors: Int = Field(3, gt=1, le=1024)
    sigma: Real = Field(4.0, ge=0.0, description="Gaussian smoothing of the anomaly map, pixels (at most image.crop)")


class IndexConfig(_Section):
    """Nearest-neighbour index over the memory bank (faiss). flat is exact; the others approximate."""
    type: Literal["auto", "flat", "ivf_flat", "ivf_pq", "hnsw"] = "auto"
    auto_flat_max: Int = Field(100_000, gt=0, description="auto: flat up to this bank size, else hnsw")
    nlist: Optional[Int] = Field(None, gt=0, le=2 ** 20, description="IVF lists; None: 4 x sqrt(bank rows)")
    nprobe: Int = Field(16, gt=0, le=2 ** 20, description="IVF lists visited per query (search time)")
    pq_m: Int = Field(64, gt=0, description="IVF-PQ sub-quantisers (must divide the dimension)")
    pq_bits: Int = Field(8, gt=0, le=16)
    hnsw_m: Int = Field(32, gt=1, le=256, description="HNSW links per node (memory grows with it)")
    ef_construction: Int = Field(200, gt=0, le=100_000)
    ef_search: Int = Field(128, gt=0, le=100_000, description="HNSW candidate list per query (search time)")
    exact_search: Literal["auto", "brute", "pruned"] = Field(
        "auto", description="flat search on the CPU: brute force, or pruned by PCA lower bounds with exact "
                            "re-rank and a proof per query (same neighbours); auto: pruned from 2048 bank rows")
    bound_dims: Int = Field(256, gt=1, le=65536, description="pruned search: dimensions of the lower bound")
    bound_candidates: Int = Field(16, gt=0, le=100_000, description="pruned search: candidates re-ranked exactly per query")


class RuntimeConfig(_Section):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: Int = Field(8, gt=0, le=MAX_BATCH, description="images per backbone batch on CPUs")
    gpu_batch_size: Int = Field(64, gt=0, le=MAX_BATCH, description="images per backbone batch on GPUs (GPU actors, "
                                                                   "in-process runs on a GPU)")
    num_actors: Optional[Int] = Field(None, gt=0, description="actor pool size; None: one per GPU, else 1")
    actor_cpus: Real = Field(1.0, gt=0.0, description="CPUs reserved per CPU actor (at most the cluster's CPUs)")
    precision: Literal["fp32", "tf32", "bf16", "fp16"] = Field(
        "fp32", description="backbone arithmetic: fp32 (IEEE, also on GPUs), tf32 (tensor-core float32 "
                            "convolutions), bf16/fp16 (autocast; for GPUs, fp16 is the one within tolerance)")
    optimize_backbone: bool = Field(True, description="fold inference BatchNorms into their convolutions and pad "
                                                      "TF-same convolutions without copies (same features, faster)")
    search_precision: Literal["fp32", "tf32"] = Field("fp32", description="GPU nearest-neighbour matmul")
    torch_threads: Optional[Int] = Field(None, gt=0, description="torch threads per actor; None: actor_cpus")
    ray_num_cpus: Optional[Int] = Field(None, gt=0, description="logical CPUs of a local Ray instance")
    executor: Literal["auto", "ray", "local"] = Field(
        "auto", description="where the stages run: ray (Ray Data tasks and actors), local (the same stage "
                            "functions in this process, no Ray), auto (local for a small job on this machine)")
    local_max_images: Int = Field(256, ge=0, le=10_000_000, description="executor=auto: jobs of at most this many "
                                                                        "images run in process when no cluster is given")

    @model_validator(mode="after")
    def _actor_fits(self):
        if self.ray_num_cpus is not None and self.actor_cpus > self.ray_num_cpus:
            raise ValueError(f"runtime.actor_cpus ({self.actor_cpus}) exceeds runtime.ray_num_cpus "
                             f"({self.ray_num_cpus}): no actor could be placed")
        return self

    def batch_for(self, device_type: str) -> int:
        """Images per backbone batch on a device of this type ("cuda" or "cpu")."""
        return self.gpu_batch_size if device_type == "cuda" else self.batch_size


class OutputConfig(_Section):
    heatmaps: bool = True
    overlay: bool = True
    # Colour scale of heatmaps: scores in [heatmap_min, heatmap_max] map onto the colour map. None:
    # the model's own scale (median .. 2 x the 99th percentile of training patch scores), fixed per model.
    heatmap_min: Optional[Real] = Field(None, ge=0.0)
    heatmap_max: Optional[Real] = Field(None, gt=0.0)
    patch_scores: bool = Field(False, description="store the patch-score grid in the score table")


class TilingConfig(_Section):
    """High-resolution inspection (:mod:`patchcore_dist.core.tiling`): tiles of side image.crop over the
    working image instead of one resized crop. Part of the feature identity when enabled."""
    enabled: bool = Field(False, description="score tiles at working resolution instead of one resized crop")
    working_size: Optional[Int] = Field(None, gt=0, le=MAX_WORKING,
                                        description="longer side of the working image; None: native resolution")
    overlap: Real = Field(0.25, ge=0.0, le=0.9, description="fraction of the tile side two neighbouring tiles share")
    bank: str = Field("single", description="single: one memory bank over all tiles (per_position is not built)")

    @field_validator("bank")
    @classmethod
    def _bank(cls, v):
        if v != "single":
            raise ValueError(f"tiling.bank={v!r} is not available: only 'single' (one memory bank over every "
                             "tile) is built; per-position banks are not")
        return v


class FitConfig(_Section):
    # Normal images held out of the memory bank to calibrate the decision threshold (when no
    # --validation folder is given); 0 disables calibration.
    holdout_fraction: Real = Field(0.0, ge=0.0, le=0.5)
    # Threshold = the image score that at most this fraction of the validation images exceed.
    target_fpr: Real = Field(0.01, ge=0.0, lt=1.0)


class StorageConfig(_Section):
    endpoint_url: Optional[str] = Field(None, description="S3-compatible endpoint, e.g. http://127.0.0.1:9000")
    region: Optional[str] = None
    shared_paths: list[str] = Field(default_factory=list, description="local folders every node of a multi-node "
                                                                      "Ray cluster sees at the same path (NFS mounts)")

    @field_validator("shared_paths")
    @classmethod
    def _shared(cls, v):
        """Absolute local folders (or file:// URIs of them), stored without the scheme and trailing slash."""
        out = []
        for p in v:
            path = p[len("file://"):] if p.startswith("file://") else p
            if "://" in path or not path.startswith("/") or path.rstrip("/") == "":
                raise ValueError(f"storage.shared_paths: {p!r} is not an absolute local folder (such as /mnt/nfs); "
                                 "the root folder / is not accepted")
            out.append(path.rstrip("/"))
        return out

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, v):
        """An http(s) URL without credentials: the config is written into config.yaml and handed to every
        task, so keys belong in the AWS environment, never here."""
        if v is None:
            return v
        u = urlparse(v)
        if "@" in u.netloc:
            raise ValueError("storage.endpoint_url must not contain credentials (user:password@): give them "
                             "through the AWS environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, roles, "
                             "config files)")
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError("storage.endpoint_url must be an http:// or https:// URL with a host")
        return v

    def options(self) -> dict:
        """Keyword arguments of the storage functions (``storage.read_bytes(uri, **options)``)."""
        return {"endpoint_url": self.endpoint_url, "region": self.region}


class Config(_Section):
    backbone: BackboneConfig = BackboneConfig()
    image: ImageConfig = ImageConfig()
    embedding: EmbeddingConfig = EmbeddingConfig()
    coreset: CoresetConfig = CoresetConfig()
    scoring: ScoringConfig = ScoringConfig()
    index: IndexConfig = IndexConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    output: OutputConfig = OutputConfig()
    fit: FitConfig = FitConfig()
    tiling: TilingConfig = TilingConfig()
    storage: StorageConfig = StorageConfig()
    seed: Int = Field(0, ge=0, le=MAX_SEED)

    @model_validator(mode="after")
    def _consistent(self):
        """Settings of different sections that must agree."""
        if self.embedding.target_dim % self.index.pq_m:
            raise ValueError(f"index.pq_m ({self.index.pq_m}) must divide embedding.target_dim "
                             f"({self.embedding.target_dim}) (IVF-PQ splits each feature into pq_m parts)")
        if self.tiling.enabled and self.image.crop % 8:
            raise ValueError(f"image.crop ({self.image.crop}) must be a multiple of 8 with tiling (tiles start on "
                             "the backbone's feature cells, 8 pixels each)")
        if self.scoring.sigma > self.image.crop:
            raise ValueError(f"scoring.sigma ({self.scoring.sigma}) is larger than the anomaly map "
                             f"(image.crop = {self.image.crop} pixels)")
        return self

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    def recorded_dict(self) -> dict:
        """The config as a model records it (config.yaml, the config digest): the values of
        :data:`IDENTITY_SECTIONS` (the tiling section only when tiling is on), and the run sections as the
        constants :data:`RUN_SECTIONS_AS_RECORDED`, in the schema's order. So the same model fitted with
        other runtime, output or storage settings, in process or on Ray, has the same identity."""
        d = self.to_dict()
        out = {}
        for section, value in d.items():
            if section in RUN_SECTIONS_AS_RECORDED:
                out[section] = copy.deepcopy(RUN_SECTIONS_AS_RECORDED[section])
            elif section in IDENTITY_SECTIONS and (section != "tiling" or self.tiling.enabled):
                out[section] = value  # an untiled model records no tiling section (absent reads as off)
        return out

    def run_dict(self) -> dict:
        """This run's own settings (the run sections), for its run record: what the model does not record."""
        d = self.to_dict()
        return {section: d[section] for section in RUN_SECTIONS_AS_RECORDED}

    def config_digest(self) -> str:
        """The digest of :meth:`recorded_dict`: the manifest's ``config_digest``, part of the model digest."""
        return hashlib.sha256(json.dumps(self.recorded_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def feature_dict(self) -> dict:
        """The part of the config that determines patch features (for reuse and compatibility)."""
        d = self.to_dict()
        out = {"backbone": d["backbone"], "image": {k: d["image"][k] for k in ("resize", "crop")},
               "embedding": d["embedding"]}
        if self.tiling.enabled:  # absent when off: the digests of untiled models stay as they were
            out["tiling"] = {k: d["tiling"][k] for k in ("working_size", "overlap", "bank")}
        return out

    def feature_digest(self) -> str:
        return hashlib.sha256(json.dumps(self.feature_dict(), sort_keys=True).encode()).hexdigest()[:16]


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from None
    return key.split("."), value


def _apply(tree: dict, path: list[str], value: Any, item: str) -> None:
    node = tree
    for part in path[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node = nxt
    node[path[-1]] = value


def _format_errors(err: ValidationError, source: str) -> str:
    """One line per problem: where, what, and the value given (never for storage: it may hold secrets)."""
    lines = [f"invalid configuration ({source}):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        echo = (e["type"] != "extra_forbidden" and not isinstance(e.get("input"), dict)
                and e["loc"][:1] != ("storage",))
        lines.append(f"  {loc}: {msg}" + (f" (got {e['input']!r})" if echo else ""))
    return "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> Config:
    """Load a YAML config (default: configs/default.yaml), apply ``key=value`` overrides, validate."""
    if base is not None:
        tree = copy.deepcopy(base)
        source = "model config"
    else:
        p = Path(path) if path else DEFAULT_CONFIG
        if not p.exists():
            raise ConfigError(f"config file not found: {p}")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
        source = str(p)
    backbone_before = tree.get("backbone") if isinstance(tree.get("backbone"), dict) else {}
    name_before, keys = backbone_before.get("name"), []
    for item in overrides or []:
        key, value = parse_override(item)
        _apply(tree, key, value, item)
        keys.append(".".join(key))
    backbone = tree.get("backbone")
    if (isinstance(backbone, dict) and backbone.get("name") != name_before and "layers" in backbone
            and not any(k in ("backbone", "backbone.layers") for k in keys)):
        # The file's levels belong to the file's backbone: another backbone on the command line gets
        # its own registry levels unless backbone.layers is given too.
        log.info("backbone.name=%s overrides %s: backbone.layers %s dropped for %s's default levels "
                 "(set backbone.layers to choose)", backbone.get("name"), name_before, backbone["layers"],
                 backbone.get("name"))
        backbone.pop("layers")
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source + (" + overrides" if overrides else ""))) from None
