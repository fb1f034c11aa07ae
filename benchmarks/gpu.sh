#!/usr/bin/env bash
# GPU measurements in one go (well under 10 minutes on one H200). Needs python3 with torch (CUDA),
# timm, torchvision, scipy, scikit-learn, pyyaml; wheels for anything else may lie in .whl/.
# Demo data: benchmarks/data (made by `python -c "from patchcore_dist.synthetic.categories import make_demo_benchmark as m; m('benchmarks/data')"`).
set -euo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
PYTHONUNBUFFERED=1 python3 -W ignore benchmarks/gpu.py "$@"
