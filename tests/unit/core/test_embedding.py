"""Locally aware patch features: the seed's shapes, and equality with the literal original formulation."""
import numpy as np
import pytest
import skimage.data
import torch

from patchcore_dist.errors import BackboneError
from patchcore_dist.core.backbones import FeatureExtractor, build_backbone
from patchcore_dist.core.inference import fold_batch_norms
from patchcore_dist.core.embedding import patch_features
from patchcore_dist.core.reference import patch_features_reference
from patchcore_dist.core.preprocessing import normalize, resize_crop


def _photos(n=2, size=224):
    names = ["chelsea", "coffee", "astronaut", "rocket"][:n]
    return np.stack([resize_crop(getattr(skimage.data, k)(), 256, size) for k in names])


@pytest.fixture(scope="module")
def wrn50():
    torch.manual_seed(0)
    return build_backbone("wide_resnet50_2", weights="random")


def test_wrn50_shapes_match_the_seed(wrn50):
    x = normalize(torch.from_numpy(_photos(2)))
    with torch.inference_mode():
        l2, l3 = wrn50(x)
    assert l2.shape == (2, 512, 28, 28)
    assert l3.shape == (2, 1024, 14, 14)
    feats, grid = patch_features([l2, l3], 3, 1024, 1024)
    assert feats.shape == (1568, 1024)
    assert grid == (28, 28)


def test_wrn50_embedding_equals_original_formulation(wrn50):
    x = normalize(torch.from_numpy(_photos(2)))
    with torch.inference_mode():
        levels = wrn50(x)
        ours, _ = patch_features(levels, 3, 1024, 1024)
        ref, _ = patch_features_reference(levels, 3, 1024, 1024)
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-5), (ours - ref).abs().max()


@pytest.mark.parametrize("dims", [(1024, 1024), (384, 256), (512, 1024)])
def test_lite0_embedding_equals_original_formulation(lite0, dims):
    x = normalize(torch.from_numpy(_photos(3)))
    with torch.inference_mode():
        levels = lite0(x)
        assert [tuple(l.shape) for l in levels] == [(3, 40, 28, 28), (3, 112, 14, 14)]
        ours, grid = patch_features(levels, 3, *dims)
        ref, _ = patch_features_reference(levels, 3, *dims)
    assert ours.shape == (3 * 784, dims[1]) and grid == (28, 28)
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-6), (ours - ref).abs().max()


def test_narrow_levels_with_bins_across_levels_equal_original():
    """Narrow levels (C*p*p <= pretrain_dim) where final bins straddle the two levels."""
    g = torch.Generator().manual_seed(2)
    levels = [torch.rand(2, 5, 12, 10, generator=g), torch.rand(2, 7, 6, 5, generator=g)]
    ours, grid = patch_features(levels, 3, 64, 50)
    ref, _ = patch_features_reference(levels, 3, 64, 50)
    assert ours.shape == (240, 50) and grid == (12, 10)
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-6), (ours - ref).abs().max()


@pytest.mark.parametrize("channels,sizes,p,pretrain,target", [
    ((3, 5, 9), (16, 8, 4), 3, 40, 100),      # three levels, final pooling 120 -> 100 (bins of one and two)
    ((64, 30), (9, 5), 3, 30, 70),            # wide first level (576 values pooled to 30); final 60 -> 70 enlarges
    ((7,), (11,), 5, 100, 33),                # one level, 5x5 neighbourhoods
])
def test_taps_equal_original_for_any_shape(channels, sizes, p, pretrain, target):
    g = torch.Generator().manual_seed(sum(channels))
    levels = [torch.randn(2, c, s, s + 1, generator=g) for c, s in zip(channels, sizes)]
    ours, grid = patch_features(levels, p, pretrain, target)
    ref, _ = patch_features_reference(levels, p, pretrain, target)
    assert ours.shape == (2 * sizes[0] * (sizes[0] + 1), target) and grid == (sizes[0], sizes[0] + 1)
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-6), (ours - ref).abs().max()


def test_patch_size_5_equals_original():
    g = torch.Generator().manual_seed(1)
    levels = [torch.rand(2, 16, 12, 10, generator=g), torch.rand(2, 24, 6, 5, generator=g)]
    ours, _ = patch_features(levels, 5, 200, 96)
    ref, _ = patch_features_reference(levels, 5, 200, 96)
    assert torch.allclose(ours, ref, atol=1e-6)


def test_forward_stops_after_the_deepest_level(wrn50):
    ran = []
    h = wrn50.model.layer4.register_forward_hook(lambda *a: ran.append("layer4"))
    try:
        with torch.inference_mode():
            wrn50(torch.zeros(1, 3, 64, 64))
    finally:
        h.remove()
    assert ran == []


def test_lite0_weights_are_real_imagenet(lite0):
    x = normalize(torch.from_numpy(_photos(2)))  # chelsea (a cat), coffee (espresso)
    with torch.inference_mode():
        logits = lite0.model(x)
    assert logits.argmax(1).tolist() == [285, 967]


def test_wrn50_without_weights_stops_with_a_clear_message():
    with pytest.raises(BackboneError, match="backbone.weights"):
        build_backbone("wide_resnet50_2")


def test_weights_from_a_file(tmp_path):
    torch.manual_seed(3)
    src = build_backbone("resnet18", weights="random")
    path = tmp_path / "r18.pth"
    torch.save(src.model.state_dict(), path)
    loaded = build_backbone("resnet18", weights=str(path))
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        for a, b in zip(src(x), loaded(x)):
            assert torch.equal(a, b)


def test_wrong_weights_file_and_unknown_level(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"foo": torch.zeros(3)}, path)
    with pytest.raises(BackboneError, match="do not fit"):
        build_backbone("resnet18", weights=str(path))
    with pytest.raises(BackboneError, match="not found"):
        build_backbone("resnet18", layers=["layer9"], weights="random")
    with pytest.raises(BackboneError, match="weights not found"):
        build_backbone("resnet18", weights=str(tmp_path / "missing.pth"))
    with pytest.raises(BackboneError, match="unknown backbone"):
        build_backbone("no_such_net", layers=["a"], weights="random")


def test_folded_batch_norms_give_the_same_features(lite0):
    folded = fold_batch_norms(lite0)
    assert folded is not lite0
    names = [type(m).__name__ for m in folded.model.modules()]
    assert names.count("BatchNormAct2d") < [type(m).__name__ for m in lite0.model.modules()].count("BatchNormAct2d")
    x = normalize(torch.from_numpy(_photos(2)))
    with torch.inference_mode():
        for a, b in zip(lite0(x), folded(x)):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(a.abs().max()))


def test_folding_is_refused_when_the_convolution_output_has_another_use():
    class ConvBnResidual(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(4)
            self.out = torch.nn.Identity()

        def forward(self, x):
            y = self.conv(x)
            return self.out(self.bn(y) + y)  # y is used twice: folding the BN into conv would be wrong

    torch.manual_seed(0)
    model = ConvBnResidual().eval()
    model.bn.running_mean.uniform_(-1, 1)
    model.bn.running_var.uniform_(0.5, 2)
    extractor = FeatureExtractor(model, ("out",))
    assert fold_batch_norms(extractor) is extractor


def test_folding_leaves_levels_alone_and_keeps_one_hook_per_level():
    import gc
    import weakref
    from timm.layers import BatchNormAct2d

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = torch.nn.Conv2d(3, 8, 3, padding=1), BatchNormAct2d(8)
            self.conv2, self.bn2 = torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8)

        def forward(self, x):
            return self.bn2(self.conv2(self.bn1(self.conv1(x))))

    torch.manual_seed(0)
    net = Net().eval()
    for bn in (net.bn1, net.bn2):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    # a level inside a BatchNormAct2d and a BN that is a level: both stay (no crash, nothing renamed)
    extractor = FeatureExtractor(net, ("bn1.act", "bn2"))
    assert fold_batch_norms(extractor) is extractor
    assert type(net.bn1).__name__ == "BatchNormAct2d" and type(net.bn2) is torch.nn.BatchNorm2d

    plain = FeatureExtractor(Net().eval(), ("bn2",))
    plain.model.bn1.running_var.uniform_(0.5, 2)
    folded = fold_batch_norms(plain)
    assert isinstance(folded.model.bn1, torch.nn.Sequential)  # folded: only its activation is left
    assert len(folded.model.bn2._forward_hooks) == 1  # the copy does not carry the original's hook
    ref = weakref.ref(plain.model)
    del plain
    gc.collect()
    assert ref() is None  # the unfolded backbone is not kept alive by the folded one


def test_patch_features_after_inference_mode_still_support_autograd():
    levels = [torch.rand(1, 6, 8, 8), torch.rand(1, 9, 4, 4)]
    with torch.inference_mode():
        patch_features(levels, 3, 96, 48)  # builds and caches the taps
    grad_levels = [l.clone().requires_grad_(True) for l in levels]
    out, _ = patch_features(grad_levels, 3, 96, 48)
    out.sum().backward()
    assert grad_levels[0].grad is not None and grad_levels[0].grad.abs().sum() > 0


def test_folding_failure_keeps_the_unfolded_backbone():
    class NeedsBigInput(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)

        def forward(self, x):
            if x.shape[-1] < 100:
                raise ValueError("input too small")
            return self.bn(self.conv(x))

    extractor = FeatureExtractor(NeedsBigInput().eval(), ("bn",))
    assert fold_batch_norms(extractor) is extractor


@pytest.mark.parametrize("kernel,stride,size", [(3, 2, 16), (5, 2, 16), (3, 2, 15), (5, 2, 17), (3, 1, 10), (4, 2, 12)])
def test_same_padding_without_copies_equals_timm(kernel, stride, size):
    from timm.layers import Conv2dSame
    from patchcore_dist.core.inference import SamePaddingConv
    torch.manual_seed(0)
    conv = Conv2dSame(6, 6, kernel, stride=stride, groups=3, bias=True).eval()
    x = torch.randn(2, 6, size, size + 2)
    with torch.inference_mode():
        assert torch.allclose(SamePaddingConv(conv)(x), conv(x), atol=1e-6)


def test_optimized_lite0_gives_the_same_features(lite0):
    from patchcore_dist.core.inference import SamePaddingConv, optimize_for_inference
    fast = optimize_for_inference(lite0)
    assert any(isinstance(m, SamePaddingConv) for m in fast.model.modules())
    x = normalize(torch.from_numpy(_photos(2)))
    with torch.inference_mode():
        for a, b in zip(lite0(x), fast(x)):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(a.abs().max()))
