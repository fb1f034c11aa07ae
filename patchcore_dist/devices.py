"""Where torch runs and with which float32 arithmetic.

Recent torch runs float32 convolutions on NVIDIA tensor cores in TF32 (10-bit mantissa) unless
told otherwise, so a "fp32" GPU backbone would silently not be float32. :func:`fp32_arithmetic`
sets the precision of float32 convolutions and matmuls for one block and restores it, through
torch's ``fp32_precision`` flags (the legacy ``allow_tf32`` flags may not be mixed with them).
"""
from __future__ import annotations

import contextlib

import torch


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device cuda was asked for (runtime.device / coreset.device) but no GPU is visible")
    return torch.device(device)


@contextlib.contextmanager
def fp32_arithmetic(conv: bool | None = None, matmul: bool | None = None):
    """Inside the block, float32 cuDNN convolutions (``conv``) and CUDA matmuls (``matmul``) run
    in IEEE float32 (False) or TF32 (True); None leaves a flag as it is. No effect on the CPU."""
    conv_flags = getattr(torch.backends.cudnn, "conv", None)
    if conv_flags is None or not hasattr(conv_flags, "fp32_precision"):  # torch before 2.9: legacy flags
        flags = [(torch.backends.cudnn, "allow_tf32", conv), (torch.backends.cuda.matmul, "allow_tf32", matmul)]
        value = bool
    else:
        flags = [(conv_flags, "fp32_precision", conv), (torch.backends.cuda.matmul, "fp32_precision", matmul)]
        value = lambda tf32: "tf32" if tf32 else "ieee"  # noqa: E731
    flags = [(owner, name, want) for owner, name, want in flags if want is not None]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in flags]
    try:
        for owner, name, want in flags:
            setattr(owner, name, value(want))
        yield
    finally:
        for owner, name, prev in saved:
            setattr(owner, name, prev)
