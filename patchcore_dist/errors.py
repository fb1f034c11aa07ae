"""Every exception the jobs raise on purpose, in one place.

Each is a :class:`PatchCoreError`: a failure whose message is meant for the user (what is wrong and
what to do). The command line (:mod:`patchcore_dist.cli`) prints that message and exits with the
code of its class; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class PatchCoreError(Exception):
    """A failure the user can act on; the message says what is wrong and what to do."""
    exit_code = 2


class ConfigError(PatchCoreError, ValueError):
    """A configuration that cannot be used; the message names every problem."""


class StorageError(PatchCoreError, RuntimeError):
    """An input or output location that cannot be used (missing, no permission, bad URI)."""


class BackboneError(PatchCoreError, RuntimeError):
    """A backbone that cannot be built as configured (unknown name, level, missing weights)."""


class DeviceError(PatchCoreError, RuntimeError):
    """A device that was asked for (runtime.device / coreset.device) but is not there."""


class ImageError(PatchCoreError, ValueError):
    """An input that cannot be used as an image; the message is the reason written to error rows."""


class ModelError(PatchCoreError, RuntimeError):
    """A model directory that cannot be used: missing, uncommitted, corrupt or incompatible."""


class ShardError(PatchCoreError, RuntimeError):
    """A feature shard that does not match its recorded sha256."""


class JobError(PatchCoreError, RuntimeError):
    """A job that cannot start or complete; the message says why. Nothing half-written is committed."""


class InjectedFault(PatchCoreError, RuntimeError):
    """A fault the fault tests asked for (``PATCHCORE_FAULT=...:raise``): an error inside a stage."""
