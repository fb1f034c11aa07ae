"""Paths on the command line, resolved once, against the working directory, before any work: what a
job stores (model URIs in score rows, run records, manifests) and compares (the score table's image
URIs against an evaluation's dataset) is always the absolute form.

Under ``ray job submit --working-dir`` the entry point runs inside Ray's temporary copy of the working
directory, which Ray deletes when the job ends: a relative output or model path would resolve into it
and the result would be lost. Such paths are refused there, before any work."""
from __future__ import annotations

import argparse
import json
import os

from ..artifacts.storage import absolute, is_relative
from ..errors import ConfigError

# Path arguments of the commands (argparse destination -> option).
PATH_ARGUMENTS = {"train": "--train", "model": "--model", "reuse": "--reuse", "validation": "--validation",
                  "images": "--images", "output": "--output", "dataset": "--dataset", "normal": "--normal",
                  "images_root": "--images-root", "exclude": "--exclude",
                  "products": "--products", "models": "--models"}
# What must outlive the job: written, or a model (read by later jobs, never inside an uploaded package).
KEPT = ("model", "reuse", "output", "models")
PATH_KEYS = ("backbone.weights",)   # config keys that hold a path (besides their keywords)
KEYWORDS = ("default", "random")


def job_package() -> str | None:
    """The working-dir package this process runs in as a ``ray job submit`` entry point, else None."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if raw:
        try:
            if (json.loads(raw).get("runtime_env") or {}).get("working_dir"):
                return os.getcwd()
        except (ValueError, AttributeError):
            pass
    cwd = os.getcwd()
    return cwd if f"{os.sep}runtime_resources{os.sep}working_dir_files{os.sep}" in cwd + os.sep else None


def resolve_arguments(args: argparse.Namespace) -> argparse.Namespace:
    """Every path argument and path override of ``args`` made absolute, in place; a relative output or
    model path under ``ray job submit`` is a ConfigError."""
    package = job_package()
    for dest, option in PATH_ARGUMENTS.items():
        value = getattr(args, dest, None)
        if not isinstance(value, str) or not value:
            continue
        if package and dest in KEPT and is_relative(value):
            raise ConfigError(f"{option} {value} is a relative path, and this job runs inside Ray's temporary copy of "
                              f"the working directory ({package}), which Ray deletes when the job ends: give an "
                              "absolute path on storage every node sees (e.g. an NFS mount declared in "
                              "storage.shared_paths) or an s3:// URI")
        setattr(args, dest, absolute(value))
    if getattr(args, "overrides", None):
        args.overrides = [_resolve_override(item) for item in args.overrides]
    return args


def _resolve_override(item: str) -> str:
    key, sep, value = item.partition("=")
    if sep and key.strip() in PATH_KEYS and value.strip() and value.strip() not in KEYWORDS:
        return f"{key}={absolute(value.strip())}"
    return item
