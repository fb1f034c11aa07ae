"""A model's backbone.weights is read within limits: a regular file of at most MAX_WEIGHTS_BYTES (2 GiB),
by the algorithm's own reader and by the pipeline's storage reader alike; /dev/zero, a FIFO (never
waited on), a folder or a larger file are refused, unread, with a BackboneError."""
import os

import pytest

from patchcore_dist.core import backbones
from patchcore_dist.errors import BackboneError
from patchcore_dist.pipeline.stages import weights_reader


def _readers():
    return [backbones.read_local, weights_reader({})]


@pytest.mark.parametrize("which", [0, 1], ids=["read_local", "storage_reader"])
def test_dev_zero_fifo_and_folders_are_refused(which, tmp_path):
    fifo = str(tmp_path / "weights.fifo")
    os.mkfifo(fifo)  # no writer: a blocking open would wait for ever
    for path in ("/dev/zero", fifo, str(tmp_path)):
        with pytest.raises(BackboneError, match="not a regular file"):
            backbones.load_state_dict(path, _readers()[which])


@pytest.mark.parametrize("which", [0, 1], ids=["read_local", "storage_reader"])
def test_weights_over_the_limit_are_refused_unread(which, tmp_path):
    big = tmp_path / "big.pt"
    with open(big, "wb") as f:
        f.truncate(backbones.MAX_WEIGHTS_BYTES + 1)  # sparse: refused by its size, never read
    with pytest.raises(BackboneError, match=r"over the limit of 2147483648 bytes \(MAX_WEIGHTS_BYTES.*: 2147483649 bytes"):
        backbones.load_state_dict(str(big), _readers()[which])


def test_a_file_at_the_limit_is_read(tmp_path):
    small = tmp_path / "w.bin"
    small.write_bytes(b"x" * 100)
    assert backbones.read_local(str(small), limit=100) == b"x" * 100
    assert backbones.read_local("file://" + str(small), limit=100) == b"x" * 100
    with pytest.raises(BackboneError, match="over the limit of 99 bytes"):
        backbones.read_local(str(small), limit=99)


def test_objects_over_the_limit_are_refused(s3, bucket, monkeypatch):
    """On S3, read to one byte over the limit: more is refused."""
    from patchcore_dist.artifacts import storage
    uri = f"s3://{bucket}/weights-limit/w.pt"
    storage.write_bytes(uri, b"y" * 101, endpoint_url=s3)
    read = weights_reader({"endpoint_url": s3, "region": None})
    monkeypatch.setattr(backbones, "MAX_WEIGHTS_BYTES", 101)
    assert read(uri) == b"y" * 101
    monkeypatch.setattr(backbones, "MAX_WEIGHTS_BYTES", 100)
    with pytest.raises(BackboneError, match="over the limit of 100 bytes"):
        backbones.load_state_dict(uri, read)


def test_the_api_reads_weights_within_the_limits(small_model, category, tmp_path):
    """patchcore_dist.api.Model builds its backbone through the same checked reader as the jobs."""
    from helpers import SMALL

    from patchcore_dist.api import Model
    from patchcore_dist.artifacts.model import load_model
    from patchcore_dist.config import load_config
    image = os.path.join(category, "test", "good", sorted(os.listdir(os.path.join(category, "test", "good")))[0])
    fifo = str(tmp_path / "w.fifo")
    os.mkfifo(fifo)
    for weights in ("/dev/zero", fifo):
        model = Model(load_model(small_model), load_config(None, SMALL + [f"backbone.weights={weights}"]), {})
        with pytest.raises(BackboneError, match="not a regular file"):
            model.predict(image)


def test_a_model_refuses_weights_other_than_those_it_was_fitted_with(category, tmp_path):
    """The manifest records the weights file's sha256; a scorer (here the API, which builds its backbone
    through the jobs' reader) refuses a file changed since the fit, which would give other features
    against the same memory bank. The model digest does not depend on the record."""
    import hashlib

    import torch
    from helpers import SMALL

    from patchcore_dist.api import Model
    from patchcore_dist.artifacts.model import model_digest
    from patchcore_dist.config import load_config
    from patchcore_dist.pipeline.fit import run_fit
    weights = str(tmp_path / "lite0.pth")
    torch.save(backbones.build_backbone("tf_efficientnet_lite0").model.state_dict(), weights)
    fast = SMALL + ["runtime.executor=local", f"backbone.weights={weights}"]
    manifest = run_fit(os.path.join(category, "train", "good"), str(tmp_path / "m"), load_config(None, fast))
    recorded = manifest["backbone_weights"]
    assert recorded["sha256"] == hashlib.sha256(open(weights, "rb").read()).hexdigest()
    assert model_digest({k: v for k, v in manifest.items() if k != "backbone_weights"}) == manifest["model_digest"]
    image = os.path.join(category, "test", "good", sorted(os.listdir(os.path.join(category, "test", "good")))[0])
    assert Model.load(str(tmp_path / "m"), ["runtime.device=cpu"]).predict(image).score > 0
    with open(weights, "ab") as f:
        f.write(b"\0")  # the same path, other content
    with pytest.raises(BackboneError, match="not the file this model was fitted with"):
        Model.load(str(tmp_path / "m"), ["runtime.device=cpu"]).predict(image)
