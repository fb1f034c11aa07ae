import pytest

from patchcore_dist.config import ConfigError, load_config


def test_default_and_overrides():
    c = load_config(None, ["coreset.ratio=0.01", "backbone.weights=/models/wrn50.pth", "backbone.layers=[a, b]"])
    assert c.backbone.name == "tf_efficientnet_lite0"
    assert c.coreset.ratio == 0.01 and c.backbone.weights == "/models/wrn50.pth" and c.backbone.layers == ["a", "b"]


def test_another_backbone_on_the_command_line_gets_its_own_levels():
    from patchcore_dist.backbones import build_backbone
    c = load_config(None, ["backbone.name=resnet18", "backbone.weights=random"])
    assert c.backbone.layers is None  # not Lite0's blocks.2 / blocks.4 from the default file
    assert build_backbone(c.backbone.name, c.backbone.layers, c.backbone.weights).layers == ("layer2", "layer3")
    both = load_config(None, ["backbone.name=resnet18", "backbone.layers=[layer1, layer2]"])
    assert both.backbone.layers == ["layer1", "layer2"]
    same = load_config(None, ["backbone.name=tf_efficientnet_lite0"])
    assert same.backbone.layers == ["blocks.2", "blocks.4"]


def test_wrn50_config_is_the_seed_setting():
    c = load_config("configs/wrn50.yaml")
    assert c.backbone.name == "wide_resnet50_2" and c.backbone.layers == ["layer2", "layer3"]
    assert (c.embedding.pretrain_dim, c.embedding.target_dim, c.coreset.ratio) == (1024, 1024, 0.1)
    assert (c.image.resize, c.image.crop) == (256, 224)


@pytest.mark.parametrize("override, message", [
    ("coreset.ratoi=0.1", "coreset.ratoi: unknown key"),
    ("coreset.ratio=abc", "coreset.ratio"),
    ("coreset.ratio=0", "greater than 0"),
    ("image.crop=300", "must not exceed image.resize"),
    ("embedding.patch_size=4", "odd"),
    ("nosuchsection.x=1", "nosuchsection: unknown key"),
    ("seed", "key=value"),
])
def test_bad_values_are_one_clear_error(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)
