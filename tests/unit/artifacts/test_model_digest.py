"""The identities written into every score row and checked on reuse must not move: a changed digest
would make every scheduled run rescore its whole archive and refuse every --reuse."""
from __future__ import annotations

import numpy as np

from patchcore_dist.artifacts.model import ModelWriter, config_yaml, load_model, npy_bytes
from patchcore_dist.config import load_config
from patchcore_dist.core.index import build_index, serialize_index

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


def _other_value(field):
    """A valid non-default value for a run-section field (from its type and default)."""
    d = field.default if field.default_factory is None else field.default_factory()
    if isinstance(d, bool):
        return not d
    if isinstance(d, (int, float)):
        return d + 1 if not isinstance(d, float) else d / 2
    if isinstance(d, list):
        return ["/mnt/nfs"]
    if isinstance(d, str):
        return {"auto": "cpu", "fp32": "tf32"}.get(d, "local" if d == "auto" else d)
    return None


def test_run_settings_never_enter_the_model_identity():
    """Every runtime / output / storage key, set to another value, leaves config.yaml, the config
    digest and so the model digest as they are (issue: runtime.gpu_batch_size=128 moved the digest)."""
    from patchcore_dist.config import RUN_SECTIONS_AS_RECORDED, Config
    base = load_config()
    overrides = {
        "runtime.num_actors=3", "runtime.torch_threads=2", "runtime.local_max_images=5", "runtime.ray_num_cpus=4",
        "runtime.executor=local",
        "output.heatmap_min=0.5", "output.heatmap_max=9", "storage.endpoint_url=http://127.0.0.1:9000",
        "storage.region=eu-west-1", "runtime.device=cpu", "runtime.precision=fp16", "runtime.search_precision=tf32"}
    for section in RUN_SECTIONS_AS_RECORDED:
        for name, field in type(getattr(Config(), section)).model_fields.items():
            value = _other_value(field)
            if value is not None and not any(o.startswith(f"{section}.{name}=") for o in overrides):
                overrides.add(f"{section}.{name}={value}")
    assert len(overrides) >= 20
    for item in sorted(overrides):
        cfg = load_config(None, [item])
        assert cfg.to_dict() != base.to_dict(), item  # the override took effect
        assert cfg.config_digest() == CONFIG_DIGEST and config_yaml(cfg) == config_yaml(base), item
    assert load_config(None, ["coreset.ratio=0.05"]).config_digest() != CONFIG_DIGEST  # a model key does move it


def test_every_config_section_is_classified():
    """A new section must be declared model-defining or a run section, never dropped silently."""
    from patchcore_dist.config import IDENTITY_SECTIONS, RUN_SECTIONS_AS_RECORDED, Config
    assert set(Config.model_fields) == set(IDENTITY_SECTIONS) | set(RUN_SECTIONS_AS_RECORDED)
