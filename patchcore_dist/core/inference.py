"""Inference-only rewrites of a backbone that keep its features and cut its time.

Each rewrite is applied to a copy of the model and kept only when every feature level still equals
the original's on a fixed probe input (:func:`_rewritten`); anything unexpected keeps the original.

- :func:`fold_batch_norms`: an inference BatchNorm after a convolution is an affine map per channel,
  so the convolution absorbs it (one pass over every activation less).
- :func:`static_same_padding`: TF-"same" convolutions without the padded copy of their input.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn

from .backbones import FeatureExtractor
from .lite0 import same_padding

log = logging.getLogger(__name__)

# The rewrites this process has reported. One process builds the backbone more than once: the fit's
# extractor, then the scorer (the demo, a fit then a score in process). Each rewrite's line is shown
# the first time only (at DEBUG after that).
_reported: set[str] = set()


def _report(what: str) -> None:
    log.log(logging.DEBUG if what in _reported else logging.INFO, "backbone: %s", what)
    _reported.add(what)


def _is_foldable_norm(module: nn.Module) -> bool:
    """An inference-mode BatchNorm2d with running statistics: plain, or timm's BatchNormAct2d."""
    plain = type(module) is nn.BatchNorm2d
    norm_act = type(module).__name__ == "BatchNormAct2d" and hasattr(module, "act") and hasattr(module, "drop")
    return (plain or norm_act) and not module.training and module.running_mean is not None


def _probe(model: nn.Module) -> torch.Tensor:
    """A fixed random input on the model's device, for finding and checking rewrites."""
    param = next(model.parameters(), None)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    return x.to(param.device) if param is not None else x


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _rewritten(extractor: FeatureExtractor, what: str, rewrite: Callable[[FeatureExtractor], nn.Module | None],
               tolerance: float) -> FeatureExtractor:
    """Apply an inference-only rewrite to a copy of the model and keep it only if every level still
    equals the original's on the probe (relative ``tolerance``); ``rewrite`` returns None when it has
    nothing to do. Any error keeps the original: these are optimisations, never a reason to fail."""
    try:
        model = rewrite(extractor)
        if model is None:
            return extractor
        result = FeatureExtractor(model, extractor.layers)
        x = _probe(model)
        with torch.inference_mode():
            for a, b in zip(extractor(x), result(x)):
                if (a - b).abs().max() > tolerance * max(1.0, float(a.abs().max())):
                    log.warning("%s changed the features; keeping the original backbone", what)
                    return extractor
    except Exception as e:  # noqa: BLE001
        log.warning("%s skipped (%s: %s); keeping the original backbone", what, type(e).__name__, e)
        return extractor
    _report(what)
    return result


def fold_batch_norms(extractor: FeatureExtractor, tolerance: float = 1e-4) -> FeatureExtractor:
    """Fold every inference-mode BatchNorm into the convolution whose output it normalises.

    BN in eval mode is an affine map per channel, y = (x - mean) * g / sqrt(var + eps) + b, so a
    preceding convolution absorbs it: w' = w * s, bias' = (bias - mean) * s + b with s = g / sqrt(var + eps).
    It saves a full pass over every activation.
    Pairs are found by running the extractor once and matching each BN's input to the tensor a
    Conv2d returned; the folded copy is checked against the original (:func:`_rewritten`).
    """
    return _rewritten(extractor, "batch norms folded into their convolutions", _fold, tolerance)


def _fold(extractor: FeatureExtractor) -> nn.Module | None:
    conv_out: dict[int, tuple[str, torch.Tensor]] = {}
    calls: dict[str, int] = {}
    pairs: list[tuple[str, str]] = []
    hooks = []
    for name, module in extractor.model.named_modules():
        if extractor.holds_level(name):  # a level keeps its name and its output
            continue
        if isinstance(module, nn.Conv2d):
            def on_conv(m, inp, out, name=name):
                calls[name] = calls.get(name, 0) + 1
                conv_out[id(out)] = (name, out)
            hooks.append(module.register_forward_hook(on_conv))
        elif _is_foldable_norm(module):
            def on_norm(m, inp, name=name):
                calls[name] = calls.get(name, 0) + 1
                hit = conv_out.get(id(inp[0]))
                if hit is not None and hit[1] is inp[0]:
                    pairs.append((hit[0], name))
            hooks.append(module.register_forward_pre_hook(on_norm))
    try:
        with torch.inference_mode():
            extractor(_probe(extractor.model))
    finally:
        for h in hooks:
            h.remove()
        conv_out.clear()
    convs = [c for c, _ in pairs]
    pairs = [(c, n) for c, n in pairs if calls[c] == 1 and calls[n] == 1 and convs.count(c) == 1]
    if not pairs:
        return None
    folded = extractor.model_copy()
    for conv_name, norm_name in pairs:
        conv, norm = folded.get_submodule(conv_name), folded.get_submodule(norm_name)
        with torch.no_grad():
            scale = torch.rsqrt(norm.running_var + norm.eps)
            shift = -norm.running_mean * scale
            if norm.weight is not None:
                scale, shift = scale * norm.weight, shift * norm.weight + norm.bias
            bias = conv.bias if conv.bias is not None else torch.zeros_like(scale)
            conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
            conv.bias = nn.Parameter(bias * scale + shift, requires_grad=False)
        rest = nn.Identity() if type(norm) is nn.BatchNorm2d else nn.Sequential(norm.drop, norm.act)
        _replace(folded, norm_name, rest)
    return folded


class SamePaddingConv(nn.Module):
    """A Conv2dSame (timm's, or :class:`.lite0.Conv2dSame`: TensorFlow "same" padding) without the
    padded copy of its input.

    Conv2dSame pads the input explicitly (F.pad) because "same" padding may be one pixel larger at the
    bottom / right than at the top / left, which conv2d's symmetric padding cannot express. Symmetric
    padding covers
    the even case; the one-pixel-larger case is a convolution with the kernel shifted by one (a zero
    row on top, a zero column on the left) and one more pixel of symmetric padding, which reads the
    same pixels with the same weights. Any other case falls back to the original module.
    """

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv
        self.register_buffer("shifted", nn.functional.pad(conv.weight.detach(), (1, 0, 1, 0)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        (kh, kw), (sh, sw), (dh, dw) = c.weight.shape[-2:], c.stride, c.dilation
        ph, pw = same_padding(x.shape[-2], kh, sh, dh), same_padding(x.shape[-1], kw, sw, dw)
        top, left = ph // 2, pw // 2
        if (top, left) == (ph - top, pw - left):
            return nn.functional.conv2d(x, c.weight, c.bias, c.stride, (top, left), c.dilation, c.groups)
        if (ph - top, pw - left) == (top + 1, left + 1) and (dh, dw) == (1, 1):
            return nn.functional.conv2d(x, self.shifted, c.bias, c.stride, (top + 1, left + 1), 1, c.groups)
        return c(x)


def static_same_padding(extractor: FeatureExtractor) -> FeatureExtractor:
    """Replace Conv2dSame modules (timm's or .lite0's) by :class:`SamePaddingConv` (identical outputs, checked by
    :func:`_rewritten`)."""
    def rewrite(ex: FeatureExtractor) -> nn.Module | None:
        names = [n for n, m in ex.model.named_modules()
                 if type(m).__name__ == "Conv2dSame" and isinstance(m, nn.Conv2d) and not ex.holds_level(n)]
        if not names:
            return None
        model = ex.model_copy()
        for name in names:
            _replace(model, name, SamePaddingConv(model.get_submodule(name)))
        return model
    return _rewritten(extractor, "same padding without copies", rewrite, 1e-5)


def optimize_for_inference(extractor: FeatureExtractor) -> FeatureExtractor:
    """Batch norms folded into their convolutions, then same padding without copies (both verified)."""
    return static_same_padding(fold_batch_norms(extractor))
