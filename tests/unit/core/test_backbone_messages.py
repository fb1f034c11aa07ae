"""What the backbone says: its inference rewrites once per process, however often it is built; a
registry backbone without weights names its own torchvision checkpoint."""
import logging

import pytest

from patchcore_dist.config import load_config
from patchcore_dist.core import backbones, inference
from patchcore_dist.errors import BackboneError


def test_rewrites_are_reported_once_per_process(monkeypatch, caplog):
    """A fit's extractor and then a scorer in one process (the demo, in-process jobs) build the backbone
    twice: each rewrite's line comes once at INFO, again at DEBUG only."""
    from patchcore_dist.core.patchcore import Embedder
    monkeypatch.setattr(inference, "_reported", set())
    config = load_config(None, ["image.resize=128", "image.crop=128"])
    with caplog.at_level(logging.DEBUG, logger="patchcore_dist.core.inference"):
        Embedder(config, "cpu")
        Embedder(config, "cpu")
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if r.getMessage().startswith("backbone: ")]
    info = [m for level, m in lines if level == logging.INFO]
    debug = [m for level, m in lines if level == logging.DEBUG]
    assert sorted(info) == ["backbone: batch norms folded into their convolutions",
                            "backbone: same padding without copies"]
    assert sorted(debug) == sorted(info)


@pytest.mark.parametrize("name", [n for n, s in backbones.REGISTRY.items() if s.default_weights is None])
def test_missing_weights_name_the_backbones_own_checkpoint(name):
    import torchvision
    url = torchvision.models.get_model_weights(name).IMAGENET1K_V1.url
    checkpoint = url.rsplit("/", 1)[1]
    hint = backbones.REGISTRY[name].weights_hint
    assert f"backbone.weights=/models/{checkpoint}" in hint and url in hint
    others = [n for n in backbones.REGISTRY if n != name]
    assert not any(f"/{o}-" in hint for o in others), hint


def test_resnet18_without_weights_says_which_file():
    with pytest.raises(BackboneError) as e:
        backbones.build_backbone("resnet18")
    assert "resnet18-f37072fd.pth" in str(e.value) and "wide_resnet50_2" not in str(e.value)
