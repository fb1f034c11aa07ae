"""What every command shares: config arguments, logging, and the mapping of errors to messages and exit codes."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from ..errors import PatchCoreError
from .paths import resolve_arguments

# Shown under every job's --help: the keys users change most (the README lists them all).
COMMON_KEYS = """config keys most often changed (key=value, see the README's configuration reference):
  backbone.name=wide_resnet50_2 backbone.weights=/models/wrn50.pth   another backbone and its weights
  coreset.ratio=0.01                  memory-bank size as a fraction of the training patches
  image.resize=256 image.crop=224     model input geometry
  runtime.device=cpu|cuda|auto        where the backbone runs; runtime.precision=fp16 on GPUs
  runtime.batch_size=8 runtime.gpu_batch_size=64 runtime.num_actors=N
  output.heatmaps=false               score only (no heatmap PNGs or overlays)
  fit.holdout_fraction=0.1            calibrate a decision threshold on held-out normal images
  storage.endpoint_url=http://host:9000   an S3-compatible endpoint (MinIO, Ceph, ...)"""


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """--config FILE and the key=value overrides."""
    p.add_argument("--config", help="YAML config (default: the packaged configs/default.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.add_argument("--verbose", action="store_true", help="also show Ray's own INFO logs and our debug lines")


def setup_logging(verbose: bool = False) -> None:
    """Our progress lines at INFO (DEBUG with ``verbose``); the libraries' own loggers at WARNING.
    Ray's loggers are quietened again once Ray is imported (:func:`patchcore_dist.pipeline.cluster.quiet_ray_logs`,
    told by the PATCHCORE_VERBOSE environment variable, which workers inherit too)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if verbose or os.environ.get("PATCHCORE_VERBOSE", "") not in ("", "0"):
        logging.getLogger("patchcore_dist").setLevel(logging.DEBUG)
        os.environ["PATCHCORE_VERBOSE"] = "1"
        return
    for noisy in ("ray", "ray.data", "botocore", "urllib3", "timm", "faiss", "faiss.loader", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_job(run, args) -> int:
    """Run ``run(args)``; a known failure (:class:`PatchCoreError`, a missing file) prints one clear
    message and returns its exit code; anything else is a bug and keeps its traceback."""
    setup_logging(bool(getattr(args, "verbose", False)))
    try:
        run(resolve_arguments(args))
    except PatchCoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
