"""Where torch runs and with which float32 arithmetic.

Recent torch runs float32 convolutions on NVIDIA tensor cores in TF32 (10-bit mantissa) unless
told otherwise, so a "fp32" GPU backbone would silently not be float32. :func:`fp32_arithmetic`
sets the precision of float32 convolutions and matmuls for one block and restores it, through
torch's ``fp32_precision`` flags (the legacy ``allow_tf32`` flags may not be mixed with them), or
the legacy flags on a torch that lacks or rejects the new ones.
"""
from __future__ import annotations

import contextlib
import threading

import torch

from ..errors import DeviceError


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise DeviceError("device cuda was asked for (runtime.device / coreset.device) but no GPU is visible")
    return torch.device(device)


def _flags(conv: bool | None, matmul: bool | None, legacy: bool) -> list[tuple[object, str, object]]:
    """(owner, attribute, value) of each flag to set: torch's fp32_precision flags, or the legacy
    allow_tf32 ones (torch before 2.9, or a build that rejects the new values)."""
    if legacy:
        flags = [(torch.backends.cudnn, "allow_tf32", conv), (torch.backends.cuda.matmul, "allow_tf32", matmul)]
        return [(owner, name, bool(want)) for owner, name, want in flags if want is not None]
    flags = [(torch.backends.cudnn.conv, "fp32_precision", conv), (torch.backends.cuda.matmul, "fp32_precision", matmul)]
    return [(owner, name, "tf32" if want else "ieee") for owner, name, want in flags if want is not None]


def _restore(saved: list) -> None:
    for owner, name, prev in reversed(saved):
        setattr(owner, name, prev)


def _apply(conv: bool | None, matmul: bool | None) -> list:
    """Set the flags (new API, else legacy); returns what to restore."""
    new_api = hasattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision")
    saved: list = []
    try:
        try:
            for owner, name, value in _flags(conv, matmul, legacy=not new_api):
                prev = getattr(owner, name)
                setattr(owner, name, value)
                saved.append((owner, name, prev))
        except (RuntimeError, ValueError, TypeError):
            if not new_api:
                raise
            _restore(saved)
            saved = []
            for owner, name, value in _flags(conv, matmul, legacy=True):
                prev = getattr(owner, name)
                setattr(owner, name, value)
                saved.append((owner, name, prev))
    except BaseException:
        _restore(saved)
        raise
    return saved


# The flags are process-wide: outermost blocks entered by several threads at once (the in-process
# executor's stage threads) share one setting, made by the first and restored by the last to leave;
# restoring per block would interleave and leave torch's convolution and RNN flags mixed (which torch
# refuses). A block nested in the same thread sets and restores its own flags.
_LOCK = threading.Lock()
_ACTIVE: dict = {"depth": 0, "saved": []}
_THREAD = threading.local()


@contextlib.contextmanager
def fp32_arithmetic(conv: bool | None = None, matmul: bool | None = None):
    """Inside the block, float32 cuDNN convolutions (``conv``) and CUDA matmuls (``matmul``) run
    in IEEE float32 (False) or TF32 (True); None leaves a flag as it is. No effect on the CPU. An
    outermost block entered while another thread's is active keeps that setting (one job, one setting)."""
    depth = getattr(_THREAD, "depth", 0)
    _THREAD.depth = depth + 1
    try:
        if depth:
            saved = _apply(conv, matmul)
            try:
                yield
            finally:
                _restore(saved)
        else:
            with _shared(conv, matmul):
                yield
    finally:
        _THREAD.depth = depth


@contextlib.contextmanager
def _shared(conv: bool | None, matmul: bool | None):
    """The process-wide part of :func:`fp32_arithmetic`: first in sets, last out restores."""
    with _LOCK:
        if _ACTIVE["depth"] == 0:
            _ACTIVE["saved"] = _apply(conv, matmul)
        _ACTIVE["depth"] += 1
    try:
        yield
    finally:
        with _LOCK:
            _ACTIVE["depth"] -= 1
            if _ACTIVE["depth"] == 0:
                _restore(_ACTIVE["saved"])
