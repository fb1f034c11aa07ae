"""Evaluate a model on an MVTec-layout category:
python jobs/evaluate.py --model URI --dataset URI --output URI [--config F] [k=v ...]"""
import os
import sys

# Submitted with `ray job submit --working-dir .`, the checkout is the working directory: put it on
# the path so the package is found even where it is not installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from patchcore_dist.cli import run_command  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_command("evaluate", prog="jobs/evaluate.py"))
