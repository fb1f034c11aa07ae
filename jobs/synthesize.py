"""Turn a folder of normal images into an MVTec-layout validation category with injected defects:
python jobs/synthesize.py --normal URI --output URI [--kinds scratch,stain,...] [--test-fraction 0.3]"""
import os
import sys

# Submitted with `ray job submit --working-dir .`, the checkout is the working directory: put it on
# the path so the package is found even where it is not installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from patchcore_dist.cli import run_command  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_command("synthesize", prog="jobs/synthesize.py"))
