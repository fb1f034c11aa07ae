"""The built-in EfficientNet-Lite0 is timm's tf_efficientnet_lite0: same state dict, bit-equal features."""
import numpy as np
import pytest
import skimage.data
import torch

from patchcore_dist.core.backbones import FeatureExtractor
from patchcore_dist.core.inference import optimize_for_inference
from patchcore_dist.core.lite0 import EfficientNetLite0, same_padding
from patchcore_dist.core.preprocessing import normalize, resize_crop

LEVELS = ("blocks.2", "blocks.4")


@pytest.fixture(scope="module")
def pair(lite0):
    """Our module and timm's, both with the offline ImageNet weights (ours as the lite0 fixture holds them)."""
    timm = pytest.importorskip("timm")
    ref = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    ref.load_state_dict(lite0.model.state_dict())
    return lite0.model, ref.eval()


def test_the_default_backbone_does_not_import_timm_or_torchvision():
    import subprocess
    import sys
    code = ("import sys; from patchcore_dist.core.backbones import build_backbone; "
            "build_backbone('tf_efficientnet_lite0'); print(sorted(m for m in ('timm', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_state_dict_names_and_shapes_equal_timms(pair):
    ours, ref = pair
    assert isinstance(ours, EfficientNetLite0)
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [(k, v.shape) for k, v in ref.state_dict().items()]


@pytest.mark.parametrize("size", [(224, 224), (231, 250), (97, 64)])  # odd sizes: asymmetric "same" padding
def test_features_and_logits_are_bit_equal_to_timms(pair, size):
    ours, ref = pair
    photos = np.stack([resize_crop(getattr(skimage.data, k)(), 256, 224) for k in ("chelsea", "coffee")])
    x = torch.nn.functional.interpolate(normalize(torch.from_numpy(photos)), size=size, mode="bilinear")
    with torch.inference_mode():
        for a, b in zip(FeatureExtractor(ours, LEVELS)(x), FeatureExtractor(ref, LEVELS)(x)):
            assert torch.equal(a, b)
        for a, b in zip(optimize_for_inference(FeatureExtractor(ours, LEVELS))(x),
                        optimize_for_inference(FeatureExtractor(ref, LEVELS))(x)):
            assert torch.equal(a, b)  # the inference rewrites treat both alike
        assert torch.equal(ours(x), ref(x))


def test_same_padding_follows_tensorflow():
    # output = ceil(size / stride): 224 / 2 with k=3 needs 1 pixel (bottom/right), 225 / 2 needs 2
    assert [same_padding(224, 3, 2), same_padding(225, 3, 2), same_padding(224, 5, 2), same_padding(7, 3, 1)] == \
        [1, 2, 3, 2]
