"""Job configuration: YAML files with typed validation and dotted command-line overrides.

One pydantic model per config section; unknown keys, wrong types and impossible values
raise :class:`ConfigError` before any work starts.
"""
from __future__ import annotations

import copy
import difflib
import hashlib
import json
import logging
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union
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
IDENTITY_SECTIONS = ("backbone", "image", "embedding", "coreset", "scoring", "index", "fit", "tiling", "denoise",
                     "seed")
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
    """The pretrained CNN whose feature maps make the patch features (part of the model's features)."""
    name: str = Field("tf_efficientnet_lite0", description=(
        "registry name (wide_resnet50_2, wide_resnet101_2, resnet18, resnet50, tf_efficientnet_lite0) or any "
        "torchvision / timm CNN"))
    layers: Optional[list[str]] = Field(None, description=(
        "feature levels (module names); null: the registry's default ([layer2, layer3] for ResNets, [blocks.2, "
        "blocks.4] for EfficientNet-Lite0). A backbone.name=... override without backbone.layers drops the config "
        "file's levels for the new backbone's own (logged)"))
    weights: str = Field("default", description=(
        "default (the registry's offline weights, if any), a path / file:// / s3:// state-dict file, or random "
        "(tests and speed benchmarks only); without usable weights a job stops at start-up and says what to give"))

    @field_validator("layers")
    @classmethod
    def _layers(cls, v):
        if v is not None and len(v) == 0:
            raise ValueError("backbone.layers must name at least one level")
        return v


class ImageConfig(_Section):
    """Model input geometry (resize, crop: part of the model's features) and the decoding limits."""
    resize: Int = Field(256, gt=0, le=MAX_RESIZE, description=(
        "shorter side after resizing, pixels (not used for tiles, see tiling.enabled)"))
    crop: Int = Field(224, gt=0, description=(
        "side of the centre crop fed to the backbone, pixels; at most image.resize; with tiling the tile side "
        "(a multiple of 8)"))
    max_pixels: Int = Field(100_000_000, gt=0, le=MAX_PIXELS, description=(
        "larger images are error rows (decompression bombs); the only pixel limit (Pillow's own "
        "MAX_IMAGE_PIXELS is set to it)"))
    max_bytes: Int = Field(512 * 2 ** 20, gt=0, description=(
        "larger files (512 MiB) are error rows, refused from the listing's size without being read"))
    min_side: Int = Field(16, gt=0, description="images with a smaller side (pixels) are error rows")

    @model_validator(mode="after")
    def _crop_fits(self):
        if self.crop > self.resize:
            raise ValueError(f"image.crop ({self.crop}) must not exceed image.resize ({self.resize})")
        return self


class EmbeddingConfig(_Section):
    """Locally aware patch features (part of the model's features)."""
    patch_size: Int = Field(3, gt=0, description=(
        "neighbourhood aggregated into each patch feature (odd: it is centred)"))
    pretrain_dim: Int = Field(1024, gt=0, le=65536, description="each level's patch pooled to this many values")
    target_dim: Int = Field(1024, gt=0, le=65536, description=(
        "all levels pooled together to this many values (the memory bank's dimension)"))

    @field_validator("patch_size")
    @classmethod
    def _odd(cls, v):
        if v % 2 != 1:
            raise ValueError("embedding.patch_size must be odd (the neighbourhood is centred)")
        return v


class CoresetConfig(_Section):
    """The memory bank: greedy k-center selection of training patches (docs/design.md#coreset)."""
    ratio: Real = Field(0.1, gt=0.0, le=1.0, description=(
        "fraction of the training patches kept in the memory bank (0 < ratio <= 1)"))
    size: Optional[Int] = Field(None, gt=0, description="absolute memory-bank size (rows); overrides ratio")
    projection_dim: Int = Field(128, gt=0, le=65536, description=(
        "Johnson-Lindenstrauss dimension the selection runs in"))
    num_starting_points: Int = Field(10, gt=0, le=100_000, description=(
        "initial distances = mean distance to this many random patches"))
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description=(
        "where the greedy selection runs: cpu, cuda, or auto (a GPU when one is visible)"))
    method: Literal["auto", "single", "two_round"] = Field("auto", description=(
        "single: one greedy pass on the driver; two_round: greedy per part in parallel Ray tasks, then greedy "
        "over the union (a composable coreset); auto: two_round from coreset.two_round_min_patches patches"))
    two_round_min_patches: Int = Field(5_000_000, gt=0, description=(
        "method=auto: training patches from which the two-round coreset is used"))
    parts: Optional[Int] = Field(None, gt=0, le=100_000, description=(
        "two_round: number of parts (Ray tasks); null: the cluster's CPUs"))
    oversample: Real = Field(2.0, gt=0.0, le=100.0, description=(
        "two_round: each part keeps oversample x its share of the bank"))

    @field_validator("size")
    @classmethod
    def _realistic(cls, v):
        if v is not None and v > MAX_BANK:
            raise ValueError(f"coreset.size={v} is larger than any realistic memory bank (at most {MAX_BANK} rows, "
                             "80 GB of float32 at D = 1024): use coreset.ratio or a smaller size")
        return v


class ScoringConfig(_Section):
    """Patch scores, the image score and the anomaly map."""
    num_neighbors: Int = Field(1, gt=0, le=1024, description=(
        "patch score = mean distance to the k nearest memory-bank features"))
    reweight: bool = Field(False, description=(
        "the paper's softmax re-weighting of the image score (off, as in the official code)"))
    reweight_neighbors: Int = Field(3, gt=1, le=1024, description="b, the neighbourhood of m* in the re-weighting")
    sigma: Real = Field(4.0, ge=0.0, description=(
        "Gaussian smoothing of the anomaly map, pixels (at model resolution; at most image.crop)"))


class IndexConfig(_Section):
    """Nearest-neighbour index over the memory bank (faiss). flat is exact; the others approximate."""
    type: Literal["auto", "flat", "ivf_flat", "ivf_pq", "hnsw"] = Field("auto", description=(
        "flat (exact), ivf_flat, ivf_pq or hnsw; auto: flat up to index.auto_flat_max bank rows, else hnsw"))
    auto_flat_max: Int = Field(100_000, gt=0, description="type=auto: flat up to this many bank rows, else hnsw")
    nlist: Optional[Int] = Field(None, gt=0, le=2 ** 20, description="IVF lists; null: 4 x sqrt(bank rows)")
    nprobe: Int = Field(16, gt=0, le=2 ** 20, description="IVF lists searched per query (search time)")
    pq_m: Int = Field(64, gt=0, description="IVF-PQ sub-quantisers (must divide embedding.target_dim)")
    pq_bits: Int = Field(8, gt=0, le=16, description="IVF-PQ bits per sub-quantiser code")
    hnsw_m: Int = Field(32, gt=1, le=256, description="HNSW links per node (memory grows with it)")
    ef_construction: Int = Field(200, gt=0, le=100_000, description="HNSW candidate list while building")
    ef_search: Int = Field(128, gt=0, le=100_000, description="HNSW candidate list per query (search time)")
    exact_search: Literal["auto", "brute", "pruned"] = Field("auto", description=(
        "how flat (exact) search runs on the CPU: brute (faiss IndexFlatL2); pruned (PCA lower bounds, exact "
        "re-rank, a proof per query, brute force where unproven: the same neighbours); auto: from 2048 bank "
        "rows (4800 with runtime.search_precision's bfloat16 brute force), per block of 1,024 queries, pruned "
        "when a probe of the bound (one query in 32) proves most of the "
        "block, else brute force (never slower than brute force by more than the probes)"))
    bound_dims: Int = Field(256, gt=1, le=65536, description=(
        "pruned search: dimensions of the lower bound (its index adds bound_dims / D of the bank's memory)"))
    bound_candidates: Int = Field(16, gt=0, le=100_000, description=(
        "pruned search: candidates measured exactly per query (timings: benchmarks/README.md)"))


class RuntimeConfig(_Section):
    """Where and how a run executes: devices, batches, actors, arithmetic (never the model's identity)."""
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description=(
        "where the backbone and the search run: cpu, cuda, or auto (a GPU when one is visible)"))
    batch_size: Int = Field(8, gt=0, le=MAX_BATCH, description=(
        "images per backbone batch on CPUs (CPU actors, in-process CPU runs)"))
    gpu_batch_size: Int = Field(64, gt=0, le=MAX_BATCH, description=(
        "images per backbone batch on GPUs (GPU actors, in-process GPU runs; 128-256 on an H200)"))
    num_actors: Optional[Int] = Field(None, gt=0, description=(
        "extraction / scoring actors; null: one per GPU, else the CPUs less one (never more than the job's "
        "batches)"))
    actor_cpus: Real = Field(1.0, gt=0.0, description=(
        "CPUs reserved per CPU actor (also its torch threads); above runtime.ray_num_cpus it is refused at "
        "load, above the cluster's CPUs when the actor pool is made"))
    precision: Literal["fp32", "tf32", "bf16", "fp16"] = Field("fp32", description=(
        "backbone arithmetic: fp32 (IEEE float32, TF32 convolutions off also on GPUs), tf32 (tensor-core float32 "
        "convolutions), fp16 / bf16 (autocast; on GPUs fp16 is the fast setting within tolerance); patch "
        "features are float32 either way"))
    optimize_backbone: bool = Field(True, description=(
        "fold each inference BatchNorm into its convolution and run TF-same-padded convolutions without padded "
        "copies (verified against the original backbone at start-up, else skipped; ~40 % faster Lite0 on CPU; "
        "the same features: not part of the feature identity)"))
    search_precision: Literal["auto", "fp32", "tf32", "bf16"] = Field("auto", description=(
        "the exact nearest-neighbour search's matmul: fp32; tf32 (GPU: its candidates re-measured in float32); "
        "bf16 (CPU: candidates nominated by a bfloat16 matmul, measured in float32, and proven to hold the "
        "float32 search's neighbours, else searched in float32); auto: bf16 on a CPU with native bfloat16 dot "
        "products (AVX512-BF16, AMX), else fp32. The same neighbours either way"))
    torch_threads: Optional[Int] = Field(None, gt=0, description="torch threads per actor; null: runtime.actor_cpus")
    ray_num_cpus: Optional[Int] = Field(None, gt=0, description=(
        "logical CPUs of a local Ray instance; null: the cores + 1"))
    executor: Literal["auto", "ray", "local"] = Field("auto", description=(
        "where the stages run: ray (Ray Data tasks and actor pools), local (the same stage functions in this "
        "process, batches on threads with one actor's thread settings, no Ray), auto (ray when a cluster is "
        "there: RAY_ADDRESS set or this process already connected to Ray; also with more than one GPU, fault "
        "injection, or a job over runtime.local_max_images; else local). The same model (bank, digests), "
        "score rows and heatmaps either way, bit for bit (tested)"))
    local_max_images: Optional[Int] = Field(None, ge=0, le=10_000_000, description=(
        "executor=auto: the largest job (images to read) run in process on a machine without a cluster; "
        "null: any size (on one machine the in-process executor was as fast or faster at every size "
        "measured, docs/operations.md)"))

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
    """What a score run writes besides the score table (never the model's identity)."""
    heatmaps: Union[bool, Literal["anomalies"]] = Field(True, description=(
        "write a heatmap PNG (and overlay) per image; false: scores only; anomalies: only for images above "
        "the decision threshold (archive-wide runs: the review page shows what exists)"))
    overlay: bool = Field(True, description="write an overlay JPEG per image (the heatmap over the photograph)")
    # Colour scale of heatmaps: scores in [heatmap_min, heatmap_max] map onto the colour map, fixed per model.
    heatmap_min: Optional[Real] = Field(None, ge=0.0, description=(
        "the heatmaps' cold end (colour level 0) by hand; null: the model's, the median pixel of normal images' "
        "anomaly maps (docs/formats.md#heatmaps)"))
    heatmap_max: Optional[Real] = Field(None, gt=0.0, description=(
        "the heatmaps' hot end (level 1) by hand; null: the model's, 2 x threshold - heatmap_min"))
    patch_scores: bool = Field(False, description=(
        "keep each image's patch-score grid (in the grid table <output>/patch_scores/; evaluate always does)"))


class TilingConfig(_Section):
    """High-resolution inspection (docs/tiling.md): tiles of side image.crop over the working image instead of
    one resized crop. Part of the model's features when enabled."""
    enabled: bool = Field(False, description=(
        "score tiles at working resolution instead of one resized crop; the tiles have side image.crop (a multiple "
        "of 8) and image.resize does not apply to them"))
    working_size: Optional[Int] = Field(None, gt=0, le=MAX_WORKING, description=(
        "longer side of the working image (the original resized, up or down); null: native resolution"))
    overlap: Real = Field(0.25, ge=0.0, le=0.9, description=(
        "fraction of the tile side neighbouring tiles share; stride = crop x (1 - overlap), rounded down to a "
        "multiple of 8"))
    bank: str = Field("single", description=(
        "single: one memory bank over every tile of every image; per_position (a bank per tile position) is "
        "refused: not built"))

    @field_validator("bank")
    @classmethod
    def _bank(cls, v):
        if v != "single":
            raise ValueError(f"tiling.bank={v!r} is not available: only 'single' (one memory bank over every "
                             "tile) is built; per-position banks are not")
        return v


class DenoiseConfig(_Section):
    """Training-set denoising before the coreset (docs/design.md#denoising): patches unlike the other training
    images' patches at the same feature cell never enter the memory bank. Part of the model when enabled."""
    enabled: bool = Field(False, description=(
        "leave the denoise.fraction most outlying training patches out of the coreset (for training folders that "
        "may hold defective images; on clean data it costs a little quality, docs/quality.md#contaminated-training-"
        "data); off or on, <model>/train_outliers.parquet ranks the training images for review"))
    method: Literal["knn", "lof"] = Field("knn", description=(
        "knn: mean distance to the k nearest other-image patches, over its median at the cell; lof: local outlier "
        "factor at the cell (denoise.radius=0 only)"))
    fraction: Real = Field(0.15, ge=0.0, lt=1.0, description=(
        "share of all training patches left out (the highest outlier scores; SoftPatch: 0.15)"))
    neighbors: Int = Field(5, gt=0, le=1024, description="k of the kNN / LOF outlier score")
    radius: Int = Field(4, ge=0, le=8, description=(
        "compare with the other images' patches within this many feature cells (Chebyshev) of the cell, for parts "
        "and textures that are not aligned from image to image (the work grows with (2 radius + 1)^2); 0: the "
        "same cell only (the one radius of method lof)"))
    max_references: Optional[Int] = Field(512, gt=1, le=1_000_000, description=(
        "compare each image with at most this many other training images (a seeded sample; null: all): the "
        "scoring's work grows with images x min(images, max_references) instead of images^2"))

    @model_validator(mode="after")
    def _lof_at_cell(self):
        if self.method == "lof" and self.radius:
            raise ValueError("denoise.method=lof compares patches at the same cell only: set denoise.radius=0 with it")
        return self


class FitConfig(_Section):
    """The decision threshold every fit calibrates (docs/operations.md#thresholds)."""
    holdout_fraction: Real = Field(0.0, ge=0.0, le=0.5, description=(
        "share of the training images held out to calibrate the threshold; only without --validation (they "
        "then stay out of the memory bank); 0: training images each scored without its own patches (up to 128)"))
    target_fpr: Real = Field(0.01, ge=0.0, lt=1.0, description=(
        "the threshold's false-positive rate; at most this fraction of the calibration images score above it "
        "(with n images the smallest rate it resolves is 1/n)"))


class StorageConfig(_Section):
    """Object storage and shared folders (never the model's identity; credentials never go here)."""
    endpoint_url: Optional[str] = Field(None, description=(
        "S3-compatible endpoint (MinIO, Ceph, ...), an http:// or https:// URL; also read from AWS_ENDPOINT_URL. "
        "A URL with credentials (http://KEY:SECRET@host) is refused, not echoed: the config is written into "
        "config.yaml and handed to every task, so keys belong in the AWS environment"))
    region: Optional[str] = Field(None, description="S3 region; null: AWS_DEFAULT_REGION, else us-east-1")
    shared_paths: list[str] = Field(default_factory=list, description=(
        "local folders every node mounts at the same path (NFS); absolute paths or file:// URIs; on a Ray cluster "
        "of two or more nodes a local path outside them is refused before any work: use s3:// or declare the "
        "mount"))

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
    denoise: DenoiseConfig = DenoiseConfig()
    storage: StorageConfig = StorageConfig()
    seed: Int = Field(0, ge=0, le=MAX_SEED, description="projection, coreset start and hold-out split")

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
        :data:`IDENTITY_SECTIONS` (the tiling and denoise sections only when they are on), and the run
        sections as the constants :data:`RUN_SECTIONS_AS_RECORDED`, in the schema's order. So the same model
        fitted with other runtime, output or storage settings, in process or on Ray, has the same identity."""
        d = self.to_dict()
        out = {}
        for section, value in d.items():
            if section in RUN_SECTIONS_AS_RECORDED:
                out[section] = copy.deepcopy(RUN_SECTIONS_AS_RECORDED[section])
            elif section in IDENTITY_SECTIONS and (section not in ("tiling", "denoise") or value["enabled"]):
                out[section] = value  # an untiled (undenoised) model records no such section: absent reads as off
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


def schema_keys() -> dict[str, Any]:
    """Every key of the schema, dotted (``coreset.ratio``, ``seed``), in schema order, with its pydantic field."""
    out = {}
    for name, field in Config.model_fields.items():
        section = field.annotation
        if isinstance(section, type) and issubclass(section, _Section):
            out.update({f"{name}.{k}": f for k, f in section.model_fields.items()})
        else:
            out[name] = field
    return out


# Which config keys each command uses (whole sections or dotted keys): the one mapping behind each
# command's --help, the warning about keys a command ignores, and docs/configuration.md. score and
# evaluate take every fit setting from the model; the model's features (MODEL_FIXED) may be given only
# with the model's values (pipeline/score.py refuses others).
_SEARCH = ("index.nprobe", "index.ef_search", "index.exact_search", "index.bound_dims", "index.bound_candidates")
_SCORE = ("scoring",) + _SEARCH + ("image.max_pixels", "image.max_bytes", "image.min_side", "runtime", "output",
                                   "storage")
COMMAND_KEYS = {
    "fit": ("backbone", "image", "embedding", "coreset", "scoring", "index", "runtime", "fit", "tiling", "denoise",
            "storage", "seed"),
    "score": _SCORE,
    "evaluate": _SCORE,
    "maintain": ("storage",),
    "runs": ("storage",),
    "catalog": ("storage",),
    "synthesize": ("seed", "storage", "image.max_pixels"),
    "demo": tuple(Config.model_fields),
}
MODEL_FIXED = ("backbone", "image.resize", "image.crop", "embedding", "tiling")


def _covers(entries: tuple, key: str) -> bool:
    return any(key == e or key.startswith(e + ".") or e.startswith(key + ".") for e in entries)


def commands_using(key: str) -> list[str]:
    """The commands that use ``key`` (a dotted key, or a section: any of its keys)."""
    return [c for c, entries in COMMAND_KEYS.items() if _covers(entries, key)]


def inapplicable(command: str, key: str) -> str | None:
    """Why the override ``key`` does nothing in ``command``; None when it applies, when score / evaluate check
    it against the model, or when the key is not in the schema (loading the config refuses it)."""
    known = schema_keys()
    if command not in COMMAND_KEYS or not any(k == key or k.startswith(key + ".") for k in known):
        return None
    if _covers(COMMAND_KEYS[command], key) or (command in ("score", "evaluate") and _covers(MODEL_FIXED, key)):
        return None
    owner = next(c for c in ("fit", "score", "synthesize") if c in commands_using(key))
    how = "uses the model's" if command in ("score", "evaluate") and owner == "fit" else "does not use it"
    return f"{key} is a {owner} setting; {command} {how} (ignored here)"


def did_you_mean(key: str) -> str | None:
    """The schema key an unknown dotted ``key`` most likely meant: the same name in another section, else the
    closest spelling."""
    known = list(schema_keys()) + list(Config.model_fields)
    leaf = key.rsplit(".", 1)[-1]
    same = [k for k in known if k.rsplit(".", 1)[-1] == leaf and k != key]
    depth = [k for k in known if k.count(".") == key.count(".")]  # a section's name is not a key's spelling
    close = difflib.get_close_matches(key, same, n=1, cutoff=0) or difflib.get_close_matches(key, depth, n=1)
    return close[0] if close else None


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
            guess = did_you_mean(loc)
            msg = "unknown key" + (f"; did you mean {guess}?" if guess else "")
        echo = (e["type"] != "extra_forbidden" and not isinstance(e.get("input"), dict)
                and e["loc"][:1] != ("storage",))
        lines.append(f"  {loc}: {msg}" + (f" (got {e['input']!r})" if echo else ""))
    return "\n".join(lines)


def _weights_beside(tree: dict, path: Path) -> None:
    """A relative local ``backbone.weights`` in a config file names a file beside that config file: made
    absolute here, once, so the model records a path that works from any working directory."""
    b = tree.get("backbone")
    w = b.get("weights") if isinstance(b, dict) else None
    if isinstance(w, str) and w not in ("default", "random") and "://" not in w and not w.startswith(("/", "~")):
        b["weights"] = str((path.resolve().parent / w).resolve())


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
        _weights_beside(tree, p)
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
