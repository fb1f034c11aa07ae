"""What every command shares: config arguments, logging, and the mapping of errors to messages and exit codes."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from ..errors import PatchCoreError
from .paths import resolve_arguments

log = logging.getLogger("patchcore_dist.cli")

# The keys users change most, most useful first: each command's --help shows those it uses
# (config.COMMAND_KEYS), with their defaults; docs/configuration.md lists every key.
USEFUL_KEYS = ("backbone.name", "backbone.weights", "coreset.ratio", "image.resize", "image.crop", "tiling.enabled",
               "fit.target_fpr", "fit.holdout_fraction", "runtime.device", "runtime.precision", "runtime.batch_size",
               "runtime.gpu_batch_size", "storage.endpoint_url", "output.heatmaps", "output.overlay",
               "output.patch_scores", "scoring.sigma", "index.nprobe", "index.ef_search", "runtime.num_actors",
               "runtime.executor", "seed", "image.max_pixels", "storage.region", "storage.shared_paths")
EPILOG_KEYS = 14


def config_epilog(command: str) -> str:
    """The --help epilog of ``command``: its most useful config keys with default and what each does."""
    from ..config import commands_using, schema_keys
    from ..config_reference import defaults, first_clause, format_value
    fields, values = schema_keys(), defaults()
    keys = [k for k in USEFUL_KEYS if command in commands_using(k)][:EPILOG_KEYS]
    lines = ["config keys (key=value; default shown; all keys: docs/configuration.md):"]
    for k in keys:
        setting = f"{k}={format_value(values[k])}"
        lines.append(f"  {setting:<36} {first_clause(fields[k].description)}")
    if command in ("score", "evaluate"):
        lines.append("  the model fixes its features (backbone, image geometry, embedding, tiling) and its fit settings")
    return "\n".join(lines)


def warn_inapplicable(command: str, overrides: list[str] | None) -> None:
    """Log a warning for each override that ``command`` does not use (config.COMMAND_KEYS)."""
    from ..config import inapplicable, parse_override
    from ..errors import ConfigError
    for item in overrides or []:
        try:
            key = ".".join(parse_override(item)[0])
        except ConfigError:
            continue  # loading the config reports it
        note = inapplicable(command, key)
        if note:
            log.warning(note)


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


def run_job(run, args, command: str | None = None) -> int:
    """Run ``run(args)``; a known failure (:class:`PatchCoreError`, a missing file) prints one clear
    message and returns its exit code; anything else is a bug and keeps its traceback. With the
    ``command``'s name, overrides it does not use are warned about first."""
    setup_logging(bool(getattr(args, "verbose", False)))
    if command:
        warn_inapplicable(command, getattr(args, "overrides", None))
    try:
        run(resolve_arguments(args))
    except PatchCoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
