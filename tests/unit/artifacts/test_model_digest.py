"""The identities written into every score row and checked on reuse must not move: a changed digest
would make every scheduled run rescore its whole archive and refuse every --reuse."""
from __future__ import annotations

import numpy as np

from patchcore_dist.artifacts.model import ModelWriter, config_yaml, load_model, npy_bytes
from patchcore_dist.config import load_config
from patchcore_dist.core.memory_bank import build_index, serialize_index

# Values of the embedded default config (configs/default.yaml); a change to the config schema, its
# defaults or the digest functions moves them. The feature digest is as computed before the package
# layout changed; the config and model digests moved when image.max_bytes was added (a new key of the
# resolved config; committed models keep the digests in their manifests). Later keys are kept out of
# them (Config.recorded_dict: the placement keys; the tiling section unless tiling is on).
FEATURE_DIGEST = "4ad6fd2f72ed6b39"
CONFIG_DIGEST = "163d714bb00b1116"
MODEL_DIGEST = "58803e5d70467bd1"  # of the model below: a fixed 64 x 1024 bank with the default config


def test_default_config_digests():
    assert load_config().feature_digest() == FEATURE_DIGEST


def test_model_digest_of_a_fixed_bank(tmp_path):
    cfg = load_config()
    bank = np.random.default_rng(0).standard_normal((64, cfg.embedding.target_dim)).astype(np.float32)
    writer = ModelWriter(str(tmp_path / "m"))
    writer.put("memory_bank.npy", npy_bytes(bank))
    writer.put("index.faiss", serialize_index(build_index(bank, cfg.index, cfg.seed)))
    writer.put("config.yaml", config_yaml(cfg))
    manifest = writer.commit(cfg, bank.shape, {}, {"heatmap_min": 0.0, "heatmap_max": 1.0})
    assert (manifest["feature_digest"], manifest["config_digest"], manifest["model_digest"]) == (
        FEATURE_DIGEST, CONFIG_DIGEST, MODEL_DIGEST)
    loaded = load_model(str(tmp_path / "m"))
    assert loaded.digest == MODEL_DIGEST and np.array_equal(loaded.bank, bank)
