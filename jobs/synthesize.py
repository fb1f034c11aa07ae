"""Turn a folder of normal images into an MVTec-layout validation category with injected defects:
python jobs/synthesize.py --normal URI --output URI [--kinds scratch,stain,...] [--test-fraction 0.3]"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from patchcore_dist.cli import main, parser  # noqa: E402


def run():
    p = parser(__doc__)
    p.add_argument("--normal", required=True, help="folder of normal images")
    p.add_argument("--output", required=True, help="new category root")
    p.add_argument("--kinds", default="scratch,stain,foreign,hole,deformation")
    p.add_argument("--test-fraction", type=float, default=0.3)
    p.add_argument("--defects-per-kind", type=int, default=None)
    a = p.parse_args()
    from patchcore_dist.config import load_config
    from patchcore_dist.synthesize import synthesize_folder
    cfg = load_config(a.config, a.overrides)
    counts = synthesize_folder(a.normal, a.output, a.kinds.split(","), a.test_fraction, a.defects_per_kind,
                               cfg.seed, cfg.storage.options(),
                               cfg.image.max_pixels)
    print(f"wrote {a.output}: {counts}")


if __name__ == "__main__":
    sys.exit(main(run))
