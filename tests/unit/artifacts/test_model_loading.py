"""Every way a model directory can be unusable is one ModelError that names the file, before any of
its content is used (a path, an array, an index)."""
from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest

from patchcore_dist.artifacts.model import (ModelWriter, config_yaml, load_model, model_digest, npy_bytes, sha256)
from patchcore_dist.config import load_config
from patchcore_dist.core.index import build_index, serialize_index
from patchcore_dist.errors import JobError, ModelError

DIM = 64


def _bank(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((200, DIM)).astype(np.float32)


@pytest.fixture
def model(tmp_path):
    cfg = load_config(None, [f"embedding.target_dim={DIM}", f"embedding.pretrain_dim={DIM}", "index.pq_m=8"])
    bank = _bank(0)
    writer = ModelWriter(str(tmp_path / "m"))
    writer.put("memory_bank.npy", npy_bytes(bank))
    writer.put("index.faiss", serialize_index(build_index(bank, cfg.index, cfg.seed)))
    writer.put("config.yaml", config_yaml(cfg))
    writer.commit(cfg, bank.shape, {}, {"heatmap_min": 0.5, "heatmap_max": 2.0, "threshold": None})
    load_model(str(tmp_path / "m"))  # valid as written
    return tmp_path / "m"


def _manifest(model) -> dict:
    return json.loads((model / "manifest.json").read_text())


def _write_manifest(model, m: dict, resign: bool = True) -> None:
    if resign:  # a consistent manifest, as someone who rewrote the model would leave it
        m["model_digest"] = model_digest(m)
    (model / "manifest.json").write_text(json.dumps(m))


def _replace(model, name: str, data: bytes, **bank) -> None:
    """Replace a model file and update its sha256 / size (and the bank shape) in a consistent manifest."""
    (model / name).write_bytes(data)
    m = _manifest(model)
    m["files"][name] = {"sha256": sha256(data), "bytes": len(data)}
    m["bank"].update(bank)
    _write_manifest(model, m)


@pytest.mark.parametrize("digest, message", [
    ("../../victim", "model_digest '../../victim' is not 16 hex digits"),
    ("0123456789abcdef", "model_digest 0123456789abcdef does not match the manifest's content"),
    (None, "model_digest None is not 16 hex digits"),
])
def test_model_digest_is_checked(model, digest, message):
    m = _manifest(model)
    m["model_digest"] = digest
    _write_manifest(model, m, resign=False)
    with pytest.raises(ModelError, match=f"manifest.json: {message}"):
        load_model(str(model))


def test_a_score_job_refuses_a_model_whose_digest_is_a_path(model, tmp_path):
    from patchcore_dist.pipeline.score import run_score
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "part-keep.parquet").write_bytes(b"precious")
    m = _manifest(model)
    m["model_digest"] = "../../victim"
    _write_manifest(model, m, resign=False)
    with pytest.raises(JobError, match="not 16 hex digits"):
        run_score(str(model), str(tmp_path), str(tmp_path / "out" / "x"))
    assert (victim / "part-keep.parquet").read_bytes() == b"precious" and not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["../outside.parquet", "/etc/passwd", "features/../../x.parquet",
                                  "features/part-1.parquet/../../../y", "notes.txt"])
def test_file_names_stay_inside_the_model_directory(model, name):
    m = _manifest(model)
    m["files"][name] = {"sha256": "0" * 64, "bytes": 1}
    _write_manifest(model, m)
    with pytest.raises(ModelError, match="is not a file of the model directory"):
        load_model(str(model))


@pytest.mark.parametrize("content, message", [
    (b"!!python/object/apply:os.system ['echo owned']\n", "config.yaml is not plain YAML"),
    (b"backbone: !custom x\n", "config.yaml is not plain YAML"),
    (b"", "config.yaml must hold the model's config as a mapping, found NoneType"),
    (b"- a\n- b\n", "config.yaml must hold the model's config as a mapping, found list"),
    (b"image: {resize: -1}\n", "config.yaml is not a valid config"),
    (b"\xff\xfe\x00garbage", "config.yaml (is not plain YAML|must hold the model's config as a mapping)"),
])
def test_bad_config_files(model, content, message):
    _replace(model, "config.yaml", content)
    with pytest.raises(ModelError, match=message):
        load_model(str(model))


def _npy_header(shape, descr="<f4") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


@pytest.mark.parametrize("make, rows, message", [
    (lambda: _npy_bytes_pickled(), 200, "memory_bank.npy is not a numpy array file|memory_bank.npy holds object"),
    (lambda: _npy_header((10 ** 12, DIM)) + b"\0" * 64, 10 ** 12, r"memory_bank.npy holds float32 \(1000000000000, 64\) in"),
    (lambda: npy_bytes(_bank(0).astype(np.float64)), 200, "memory_bank.npy holds float64"),
    (lambda: b"not numpy at all", 200, "memory_bank.npy is not a numpy array file"),
])
def test_bad_memory_banks(model, make, rows, message):
    _replace(model, "memory_bank.npy", make(), rows=rows)
    with pytest.raises(ModelError, match=message):
        load_model(str(model))


def _npy_bytes_pickled() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    return buf.getvalue()


def test_garbage_and_foreign_indexes(model):
    _replace(model, "index.faiss", b"IxF2" + os.urandom(200))
    with pytest.raises(ModelError, match="index.faiss is not a faiss index"):
        load_model(str(model))
    cfg = load_config(None, [f"embedding.target_dim={DIM}", f"embedding.pretrain_dim={DIM}", "index.pq_m=8"])
    _replace(model, "index.faiss", serialize_index(build_index(_bank(1), cfg.index, 0)))  # same shape, other rows
    with pytest.raises(ModelError, match="index.faiss was not built over this memory bank"):
        load_model(str(model))


@pytest.mark.parametrize("index_type", ["ivf_flat", "ivf_pq", "hnsw"])
def test_approximate_indexes_over_the_bank_are_accepted(model, index_type):
    cfg = load_config(None, [f"embedding.target_dim={DIM}", f"embedding.pretrain_dim={DIM}", "index.pq_m=8",
                             f"index.type={index_type}", "index.pq_bits=4"])
    _replace(model, "index.faiss", serialize_index(build_index(_bank(0), cfg.index, 0)))
    assert load_model(str(model)).index.ntotal == 200


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["stats"].pop("heatmap_min"), "'stats' needs finite numbers heatmap_min and heatmap_max"),
    (lambda m: m["stats"].update(heatmap_max="high"), "'stats' needs finite numbers"),
    (lambda m: m["stats"].update(threshold=[1]), "'stats.threshold' must be a finite number or null"),
    (lambda m: m.pop("stats"), "'stats' needs"),
    (lambda m: m["bank"].update(rows=True), "'bank' needs positive integer rows and dim"),
    (lambda m: m["files"].pop("index.faiss"), "'files' must list at least"),
    (lambda m: m["files"]["config.yaml"].update(sha256="../x"), "the entry of 'config.yaml' needs a sha256"),
    (lambda m: m.update(format_version=99), "model format 99 is not supported"),
])
def test_incomplete_manifests(model, edit, message):
    m = _manifest(model)
    edit(m)
    if "files" in m and "bank" in m and "config_digest" in m:
        _write_manifest(model, m)
    else:
        _write_manifest(model, m, resign=False)
    with pytest.raises(ModelError, match=f"manifest.json: {message}"):
        load_model(str(model))


@pytest.mark.parametrize("raw", [b"[1, 2]", b"{not json", b"\xff\xfe"])
def test_a_manifest_that_is_not_an_object(model, raw):
    (model / "manifest.json").write_bytes(raw)
    with pytest.raises(ModelError, match="manifest.json"):
        load_model(str(model))
