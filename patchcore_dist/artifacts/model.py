"""The model artifact: a directory written once, with ``manifest.json`` written last as the commit marker.

    <model>/memory_bank.npy   [K, D] float32 (numpy format, loaded with allow_pickle=False)
    <model>/index.faiss       faiss's own serialisation of the index over the bank (index.type)
    <model>/config.yaml       the resolved config
    <model>/images.parquet    one row per training image: uri, digest, feature shard and row, or error
    <model>/errors.parquet    training images that could not be used, with the reason
    <model>/features/*.parquet  patch-feature shards (float16); validation/*.parquet for the threshold
    <model>/manifest.json     versions, digests, bank shape, sha256 of every file: the commit marker

No pickles: JSON/YAML, .npy without objects, faiss's format, Parquet.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import logging
import platform
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
MODEL_FILES = ("memory_bank.npy", "index.faiss", "config.yaml", "images.parquet", "errors.parquet")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def dependency_versions() -> dict:
    out = {"python": platform.python_version()}
    for mod in ("torch", "torchvision", "timm", "faiss", "numpy", "pyarrow", "ray"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            pass
    return out


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


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

    def commit(self, config: Config, bank_shape: tuple[int, int], training: dict, stats: dict) -> dict:
        body = {
            "format_version": FORMAT_VERSION,
            "library": {"name": "patchcore-dist", "version": __version__},
            "dependencies": dependency_versions(),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "config_digest": sha256(json.dumps(config.to_dict(), sort_keys=True).encode())[:16],
            "feature_digest": config.feature_digest(),
            "bank": {"rows": int(bank_shape[0]), "dim": int(bank_shape[1])},
            "training": training,
            "stats": stats,
            "files": dict(sorted(self.files.items())),
        }
        core = {k: body[k] for k in ("config_digest", "bank", "files")}
        core["files"] = {k: v for k, v in body["files"].items() if k in REQUIRED}
        body["model_digest"] = sha256(json.dumps(core, sort_keys=True).encode())[:16]
        storage.write_bytes(storage.join(self.uri, MANIFEST), json.dumps(body, indent=2).encode(),
                            **self.storage_options)
        return body


def config_yaml(config: Config) -> bytes:
    return yaml.safe_dump(config.to_dict(), sort_keys=False).encode()


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


def read_manifest(uri: str, storage_options: dict | None = None) -> dict:
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
    except json.JSONDecodeError as e:
        raise ModelError(f"{uri}/{MANIFEST} is not valid JSON: {e}") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ModelError(f"{uri}: model format {manifest.get('format_version')} is not supported "
                         f"(this library reads format {FORMAT_VERSION})")
    return manifest


def read_verified(uri: str, manifest: dict, name: str, storage_options: dict | None = None) -> bytes:
    entry = manifest["files"].get(name)
    if entry is None:
        raise ModelError(f"{uri}: {name} is not listed in the manifest")
    try:
        data = storage.read_bytes(storage.join(uri, name), **(storage_options or {}))
    except FileNotFoundError:
        raise ModelError(f"{uri}: {name} is missing") from None
    if sha256(data) != entry["sha256"]:
        raise ModelError(f"{uri}: {name} does not match its sha256 in the manifest (corrupt or changed)")
    return data


def load_model(uri: str, storage_options: dict | None = None) -> LoadedModel:
    """Read and verify a committed model: every required file against its sha256, shapes against config."""
    manifest = read_manifest(uri, storage_options)
    try:
        config = load_config(base=yaml.safe_load(read_verified(uri, manifest, "config.yaml", storage_options)))
    except ConfigError as e:
        raise ModelError(f"{uri}: config.yaml is not a valid config: {e}") from None
    bank = load_npy(read_verified(uri, manifest, "memory_bank.npy", storage_options))
    index_bytes = read_verified(uri, manifest, "index.faiss", storage_options)
    rows, dim = manifest["bank"]["rows"], manifest["bank"]["dim"]
    if bank.dtype != np.float32 or bank.shape != (rows, dim):
        raise ModelError(f"{uri}: memory bank is {bank.dtype} {bank.shape}, manifest says float32 ({rows}, {dim})")
    if dim != config.embedding.target_dim:
        raise ModelError(f"{uri}: memory bank dimension {dim} != embedding.target_dim {config.embedding.target_dim}")
    from ..core.memory_bank import deserialize_index
    index = deserialize_index(index_bytes)
    if index.ntotal != rows or index.d != dim:
        raise ModelError(f"{uri}: index.faiss holds {index.ntotal} x {index.d}, bank is {rows} x {dim}")
    return LoadedModel(uri, manifest, config, bank, index)


def clean_uncommitted(model: str, opts: dict) -> None:
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
