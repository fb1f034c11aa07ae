"""EfficientNet-Lite0 (the default offline backbone) as plain torch modules, without importing timm.

timm's ``tf_efficientnet_lite0`` is the reference, and this module mirrors it exactly: the same
module names, parameter order and shapes (so timm's state dict, and the offline checkpoint matched to
it, load unchanged), and the same operations in the same order (so the features are bit-equal to
timm's; tested in tests/unit/core/test_lite0.py). Why not timm itself: importing timm imports
torchvision.ops, which imports torch._dynamo, sympy and triton, about 2.5 s on 2 cores, in every
job process and every Ray actor, for a network of fifteen blocks. timm still builds every other
timm backbone (:mod:`.backbones`).

Architecture (Tan & Le, EfficientNet-Lite: ReLU6, no squeeze-excite, fixed stem and head): a 3x3
stride-2 stem to 32 channels, then seven stages of (expansion, kernel, stride, channels, repeats)
given in :data:`STAGES`, a 1x1 head to 1280 channels and a linear ImageNet classifier. Convolutions
use TensorFlow's "same" padding: symmetric at stride 1, explicit (possibly one pixel larger at the
bottom / right) at stride 2, as timm's ``Conv2dSame``.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

BN_EPS = 1e-3  # TensorFlow's BatchNorm epsilon, as timm's tf_ models use
# (expansion ratio, kernel, stride, output channels, repeats) per stage; stage 0 is depthwise-separable
STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
          (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> int:
    """Total padding of one axis under TensorFlow's "same" rule (output = ceil(size / stride))."""
    return max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)


class Conv2dSame(nn.Conv2d):
    """A convolution with TensorFlow "same" padding, padded explicitly (as timm's ``Conv2dSame``; the
    inference rewrite :func:`.inference.static_same_padding` replaces it by an equal copy-free one)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (kh, kw), (sh, sw), (dh, dw) = self.weight.shape[-2:], self.stride, self.dilation
        ph, pw = same_padding(x.shape[-2], kh, sh, dh), same_padding(x.shape[-1], kw, sw, dw)
        if ph or pw:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, (0, 0), self.dilation, self.groups)


def conv(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """A bias-free convolution with "same" padding: static and symmetric where that is exact (stride 1,
    odd kernel), else :class:`Conv2dSame`."""
    if stride == 1 and kernel % 2:
        return nn.Conv2d(cin, cout, kernel, 1, (kernel - 1) // 2, groups=groups, bias=False)
    return Conv2dSame(cin, cout, kernel, stride, 0, groups=groups, bias=False)


class BatchNormAct2d(nn.BatchNorm2d):
    """BatchNorm followed by an activation (ReLU6 or none), as timm's ``BatchNormAct2d``; its ``drop``
    and ``act`` attributes are what :func:`.inference.fold_batch_norms` keeps after folding."""

    def __init__(self, channels: int, act: bool = True):
        super().__init__(channels, eps=BN_EPS)
        self.drop = nn.Identity()
        self.act = nn.ReLU6(inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


class DepthwiseSeparableConv(nn.Module):
    """Stage 0's block: depthwise conv, BN + ReLU6, pointwise conv, BN (no residual: 32 -> 16 channels)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int):
        super().__init__()
        self.has_skip = stride == 1 and cin == cout
        self.conv_dw = conv(cin, cin, kernel, stride, groups=cin)
        self.bn1 = BatchNormAct2d(cin)
        self.conv_pw = conv(cin, cout, 1)
        self.bn2 = BatchNormAct2d(cout, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv_pw(self.bn1(self.conv_dw(x))))
        return y + x if self.has_skip else y


class InvertedResidual(nn.Module):
    """MBConv: pointwise expansion, BN + ReLU6, depthwise conv, BN + ReLU6, pointwise projection, BN,
    plus the input when shape allows (stride 1, same channels)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expansion: int):
        super().__init__()
        mid = cin * expansion
        self.has_skip = stride == 1 and cin == cout
        self.conv_pw = conv(cin, mid, 1)
        self.bn1 = BatchNormAct2d(mid)
        self.conv_dw = conv(mid, mid, kernel, stride, groups=mid)
        self.bn2 = BatchNormAct2d(mid)
        self.conv_pwl = conv(mid, cout, 1)
        self.bn3 = BatchNormAct2d(cout, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn3(self.conv_pwl(self.bn2(self.conv_dw(self.bn1(self.conv_pw(x))))))
        return y + x if self.has_skip else y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 with timm's module names (``conv_stem``, ``bn1``, ``blocks.S.B.*``,
    ``conv_head``, ``bn2``, ``classifier``); ``blocks.2`` and ``blocks.4`` end the stride-8 and
    stride-16 stages."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.conv_stem = conv(3, 32, 3, 2)
        self.bn1 = BatchNormAct2d(32)
        stages, cin = [], 32
        for i, (expansion, kernel, stride, cout, repeats) in enumerate(STAGES):
            blocks = []
            for r in range(repeats):
                s = stride if r == 0 else 1
                blocks.append(DepthwiseSeparableConv(cin, cout, kernel, s) if i == 0
                              else InvertedResidual(cin, cout, kernel, s, expansion))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        self.conv_head = conv(cin, 1280, 1)
        self.bn2 = BatchNormAct2d(1280)
        self.classifier = nn.Linear(1280, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        """He-normal convolutions (fan-out, per group), unit BN, a uniform classifier: a usable random
        network for ``backbone.weights=random``; real weights replace all of it."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.weight.size(0))
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn2(self.conv_head(self.blocks(self.bn1(self.conv_stem(x)))))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
