"""The model artifact: a directory written once, with ``manifest.json`` written last as the commit marker.

    <model>/memory_bank.npy   [K, D] float32 (numpy format, loaded with allow_pickle=False)
    <model>/index.faiss       faiss's own serialisation of the index over the bank (index.type)
    <model>/config.yaml       the resolved config as the model records it (Config.recorded_dict)
    <model>/images.parquet    one row per training image: uri, digest, feature shard and row, or error
    <model>/errors.parquet    training images that could not be used, with the reason
    <model>/train_outliers.parquet  one row per training image: outlier score, share of patches denoised
    <model>/features/*.parquet  patch-feature shards (float16); validation/*.parquet for the threshold
    <model>/manifest.json     versions, digests, bank shape, sha256 of every file: the commit marker
    <model>/.fit-lease, .patchcore-fit  while a fit runs / until it commits (artifacts/lease.py)

No pickles: JSON/YAML, .npy without objects, faiss's format, Parquet.
"""
from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import io
import json
import logging
import platform
import re
from dataclasses import dataclass, field

import numpy as np
import pyarrow.parquet as pq
import yaml

from .. import __version__
from ..config import Config, load_config
from ..errors import ConfigError, JobError, ModelError
from . import storage

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
REQUIRED = ("memory_bank.npy", "index.faiss", "config.yaml")
# Every file a fit writes besides the feature shards (features/, validation/) and the manifest.
MODEL_FILES = ("memory_bank.npy", "index.faiss", "config.yaml", "images.parquet", "errors.parquet",
               "train_outliers.parquet")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def config_digest(config: Config) -> str:
    """The config digest a model's manifest records (``config_digest``): compare it to tell whether an
    existing model was fitted with ``config``."""
    return config.config_digest()


def dependency_versions() -> dict:
    """Versions of the libraries that shape a model, for its manifest: an imported module's own
    ``__version__``, else its installed distribution's (importing torchvision or timm just to ask
    would cost seconds); libraries that are not installed are left out."""
    import sys
    from importlib import metadata
    out = {"python": platform.python_version()}
    for mod, dists in (("torch", ("torch",)), ("torchvision", ("torchvision",)), ("timm", ("timm",)),
                       ("faiss", ("faiss-cpu", "faiss-gpu-cu12", "faiss-gpu", "faiss")), ("numpy", ("numpy",)),
                       ("pyarrow", ("pyarrow",)), ("ray", ("ray",))):
        version = getattr(sys.modules.get(mod), "__version__", None)
        for dist in dists if version is None else ():
            try:
                version = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
        if version is not None:
            out[mod] = str(version)
    return out


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


@dataclass
class ModelWriter:
    """Collects a model's files; :meth:`commit` writes the manifest last."""
    uri: str
    storage_options: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)

    def put(self, name: str, data: bytes) -> None:
        storage.write_bytes(storage.join(self.uri, name), data, **self.storage_options)
        self.files[name] = {"sha256": sha256(data), "bytes": len(data)}

    def record(self, name: str, sha: str, nbytes: int) -> None:
        """A file written elsewhere (a feature shard written by a worker)."""
        self.files[name] = {"sha256": sha, "bytes": nbytes}

    def commit(self, config: Config, bank_shape: tuple[int, int], training: dict, stats: dict,
               backbone_weights: dict | None = None) -> dict:
        """Write the manifest (the commit marker). ``backbone_weights``: the weights file's uri, sha256
        and bytes, checked by every scorer (outside the model digest: the bank's hash already differs
        when other weights made it, and earlier models keep their digests)."""
        body = {
            "format_version": FORMAT_VERSION,
            "library": {"name": "patchcore-dist", "version": __version__},
            "dependencies": dependency_versions(),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "config_digest": config.config_digest(),
            "feature_digest": config.feature_digest(),
            "bank": {"rows": int(bank_shape[0]), "dim": int(bank_shape[1])},
            "training": training,
            "stats": stats,
            "files": dict(sorted(self.files.items())),
            **({"backbone_weights": backbone_weights} if backbone_weights else {}),
        }
        body["model_digest"] = model_digest(body)
        storage.write_bytes(storage.join(self.uri, MANIFEST), json.dumps(body, indent=2).encode(),
                            **self.storage_options)
        return body


def config_yaml(config: Config) -> bytes:
    return yaml.safe_dump(config.recorded_dict(), sort_keys=False).encode()


@dataclass
class LoadedModel:
    uri: str
    manifest: dict
    config: Config
    bank: np.ndarray
    index: object = None  # the faiss index; PatchCore applies the run's search parameters

    @property
    def digest(self) -> str:
        return self.manifest["model_digest"]

    @property
    def heatmap_range(self) -> tuple[float, float]:
        st = self.manifest["stats"]
        return float(st["heatmap_min"]), float(st["heatmap_max"])


_HEX16 = re.compile(r"[0-9a-f]{16}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
# The only names a manifest may list: the model files and feature shards of this layout (never a
# path out of the model directory).
_SHARD = re.compile(r"(features|validation)/part-[A-Za-z0-9-]+\.parquet")


def model_digest(manifest: dict) -> str:
    """The model's id: a digest of its config digest, bank shape and the files a scorer loads."""
    core = {k: manifest[k] for k in ("config_digest", "bank")}
    core["files"] = {k: v for k, v in manifest["files"].items() if k in REQUIRED}
    return sha256(json.dumps(core, sort_keys=True).encode())[:16]


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)


# The statistics a score run reads after its commit (run record, review page): checked at load, so a
# manifest without them is refused before any work, never after the scores are written.
_CALIBRATION_NUMBERS = ("target_fpr", "calibration_fpr", "fpr_resolution", "threshold_images")


def _stats_problem(stats) -> str | None:
    """What makes the manifest's ``stats`` unusable for the scorer, the review page and the API, or None."""
    if not (isinstance(stats, dict) and _number(stats.get("heatmap_min")) and _number(stats.get("heatmap_max"))):
        return "'stats' needs finite numbers heatmap_min and heatmap_max"
    if stats.get("threshold") is not None and not _number(stats["threshold"]):
        return "'stats.threshold' must be a finite number or null"
    if "heatmap_threshold" in stats and not (_number(stats["heatmap_threshold"])
                                             and isinstance(stats.get("heatmap_threshold_source"), str)):
        return "'stats.heatmap_threshold' must be a finite number, with a heatmap_threshold_source text"
    if any(k in stats for k in _CALIBRATION_NUMBERS) and not all(_number(stats.get(k)) for k in _CALIBRATION_NUMBERS):
        return f"'stats' needs all of {', '.join(_CALIBRATION_NUMBERS)} as finite numbers, or none of them"
    ref = stats.get("normal_image_score")
    if ref is not None and not (isinstance(ref, dict) and (ref.get("p99") is None or (
            _number(ref["p99"]) and _count(ref.get("images")) and _count(ref.get("above_p99", 0))))):
        return "'stats.normal_image_score' needs a finite p99 with counts images and above_p99, or no p99"
    return None


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _manifest_problem(m) -> str | None:
    """What makes a parsed manifest unusable, or None."""
    if not isinstance(m, dict):
        return "not a JSON object"
    if m.get("format_version") != FORMAT_VERSION:
        return f"model format {m.get('format_version')!r} is not supported (this library reads format {FORMAT_VERSION})"
    files = m.get("files")
    if not isinstance(files, dict) or not all(r in files for r in REQUIRED):
        return f"'files' must list at least {', '.join(REQUIRED)}"
    for name, e in files.items():
        if not (name in MODEL_FILES or _SHARD.fullmatch(name)):
            return f"file name {name!r} is not a file of the model directory"
        if not (isinstance(e, dict) and isinstance(e.get("sha256"), str) and _HEX64.fullmatch(e["sha256"])
                and isinstance(e.get("bytes"), int) and e["bytes"] >= 0):
            return f"the entry of {name!r} needs a sha256 (64 hex digits) and a size in bytes"
    bank = m.get("bank")
    if not (isinstance(bank, dict) and all(isinstance(bank.get(k), int) and not isinstance(bank.get(k), bool)
                                           and bank[k] > 0 for k in ("rows", "dim"))):
        return "'bank' needs positive integer rows and dim"
    weights = m.get("backbone_weights")
    if weights is not None and not (isinstance(weights, dict) and isinstance(weights.get("sha256"), str)
                                    and _HEX64.fullmatch(weights["sha256"])):
        return "'backbone_weights' needs a sha256 (64 hex digits)"
    problem = _stats_problem(m.get("stats"))
    if problem:
        return problem
    digest = m.get("model_digest")
    if not (isinstance(digest, str) and _HEX16.fullmatch(digest)):
        return f"model_digest {digest!r} is not 16 hex digits"
    if not isinstance(m.get("config_digest"), str) or digest != model_digest(m):
        return f"model_digest {digest} does not match the manifest's content (changed after the fit?)"
    return None


def read_manifest(uri: str, storage_options: dict | None = None) -> dict:
    """The model's manifest, checked: format, file names inside the directory, sizes and digests, the
    statistics the scorer needs, and a model_digest equal to the one recomputed from the content."""
    opts = storage_options or {}
    try:
        raw = storage.read_bytes(storage.join(uri, MANIFEST), **opts)
    except FileNotFoundError:
        if storage.exists(uri, **opts):
            raise ModelError(f"{uri} has no {MANIFEST}: the model was never committed (an interrupted fit?) "
                             "and cannot be loaded") from None
        raise ModelError(f"model not found: {uri}") from None
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{uri}/{MANIFEST} is not valid JSON: {e}") from None
    problem = _manifest_problem(manifest)
    if problem:
        raise ModelError(f"{uri}/{MANIFEST}: {problem}")
    return manifest


def read_verified(uri: str, manifest: dict, name: str, storage_options: dict | None = None) -> bytes:
    entry = manifest["files"].get(name)
    if entry is None:
        raise ModelError(f"{uri}/{name}: not listed in the manifest")
    try:
        data = storage.read_bytes(storage.join(uri, name), **(storage_options or {}))
    except FileNotFoundError:
        raise ModelError(f"{uri}/{name} is missing") from None
    if sha256(data) != entry["sha256"]:
        raise ModelError(f"{uri}/{name} does not match its sha256 in the manifest (corrupt or changed)")
    return data


def parse_config(where: str, data: bytes) -> Config:
    """config.yaml's bytes -> the model's Config; a ModelError naming the file for anything else than a
    complete config mapping (YAML tags, an empty file, a list)."""
    try:
        tree = yaml.safe_load(data)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ModelError(f"{where} is not plain YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(tree, dict) or not tree:
        raise ModelError(f"{where} must hold the model's config as a mapping, found {type(tree).__name__}")
    try:
        return load_config(base=tree)
    except ConfigError as e:
        raise ModelError(f"{where} is not a valid config: {e}") from None


def parse_bank(where: str, data: bytes, rows: int, dim: int) -> np.ndarray:
    """memory_bank.npy's bytes -> [rows, dim] float32, from the header checked before any array is made
    (no object arrays, no shape the file does not hold)."""
    fmt = np.lib.format
    buf = io.BytesIO(data)
    try:
        version = fmt.read_magic(buf)
        read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, fortran, dtype = read_header(buf)
    except (ValueError, OSError, SyntaxError) as e:
        raise ModelError(f"{where} is not a numpy array file: {e}") from None
    if dtype != np.dtype("<f4") or fortran or tuple(shape) != (rows, dim) or len(data) - buf.tell() != rows * dim * 4:
        raise ModelError(f"{where} holds {dtype} {tuple(shape)} in {len(data)} bytes; the manifest says float32 "
                         f"({rows}, {dim})")
    return np.frombuffer(data, dtype="<f4", offset=buf.tell()).reshape(rows, dim).copy()


def parse_index(where: str, data: bytes, bank: np.ndarray):
    """index.faiss's bytes -> the faiss index, checked to hold this bank."""
    from ..core.index import deserialize_index, index_holds
    try:
        index = deserialize_index(data)
    except (RuntimeError, MemoryError) as e:
        raise ModelError(f"{where} is not a faiss index: {str(e).splitlines()[0][:200]}") from None
    if index.ntotal != bank.shape[0] or index.d != bank.shape[1]:
        raise ModelError(f"{where} holds {index.ntotal} x {index.d}, the bank is {bank.shape[0]} x {bank.shape[1]}")
    if not index_holds(index, bank):
        raise ModelError(f"{where} was not built over this memory bank (its stored rows differ)")
    return index


def load_model(uri: str, storage_options: dict | None = None) -> LoadedModel:
    """Read and verify a committed model: the manifest, every required file against its sha256, the
    config, the bank against the manifest's shape and the config's dimension, the index against the
    bank. Any failure is one ModelError naming the file."""
    manifest = read_manifest(uri, storage_options)
    where = functools.partial(storage.join, uri)  # a file's URI, for the messages
    config = parse_config(where("config.yaml"), read_verified(uri, manifest, "config.yaml", storage_options))
    rows, dim = manifest["bank"]["rows"], manifest["bank"]["dim"]
    if dim != config.embedding.target_dim:
        raise ModelError(f"{where(MANIFEST)}: bank dimension {dim} != embedding.target_dim "
                         f"{config.embedding.target_dim} of config.yaml")
    bank = parse_bank(where("memory_bank.npy"), read_verified(uri, manifest, "memory_bank.npy", storage_options),
                      rows, dim)
    index = parse_index(where("index.faiss"), read_verified(uri, manifest, "index.faiss", storage_options), bank)
    return LoadedModel(uri, manifest, config, bank, index)


def remove_orphan_shards(model: str, recorded: set[str], opts: dict) -> None:
    """Delete feature shards no image row points to: those of a batch whose actor died after writing
    them (Ray ran the batch again, into new shards). Only the recorded shards go into the manifest."""
    for split in ("features", "validation"):
        try:
            files = storage.list_files(storage.join(model, split), (".parquet",), **opts)
        except FileNotFoundError:
            continue
        orphans = [u for u, rel in files if f"{split}/{rel}" not in recorded]
        if orphans:
            log.info("removing %d %s shards of retried batches (no image row points to them)", len(orphans), split)
        for uri in orphans:
            storage.delete(uri, **opts)


def reusable_features(old: str, config: Config, opts: dict) -> dict:
    """digest -> (feature shard URI, row, sha256) of every usable image of a committed model with the same
    features (the sha256 from the old manifest: a reused shard is verified before it is copied)."""
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
