"""Shared command-line handling of the jobs: arguments, logging, clear errors and exit codes."""
from __future__ import annotations

import argparse
import logging
import sys

from .config import ConfigError


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", help="YAML config (default: configs/default.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return p


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("ray", "ray.data", "botocore", "urllib3", "timm", "faiss", "faiss.loader"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(run) -> int:
    """Run ``run()``; known failures print one clear message and exit non-zero."""
    from .backbones import BackboneError
    from .fit import JobError
    from .model import ModelError
    from .storage import StorageError
    setup_logging()
    try:
        run()
    except (ConfigError, JobError, ModelError, BackboneError, StorageError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
