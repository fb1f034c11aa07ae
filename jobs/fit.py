"""Fit a PatchCore model on normal images:
python jobs/fit.py --train URI --model URI [--reuse OLD] [--validation URI] [--config F] [k=v ...]"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from patchcore_dist.cli import main, parser  # noqa: E402


def run():
    p = parser(__doc__)
    p.add_argument("--train", required=True, help="folder of normal images, or an MVTec AD category root")
    p.add_argument("--model", required=True, help="new model directory (local path, file:// or s3://)")
    p.add_argument("--reuse", help="an earlier model: reuse its features of unchanged images")
    p.add_argument("--validation", help="normal images to calibrate the decision threshold on "
                                        "(else fit.holdout_fraction of the training images, if set)")
    a = p.parse_args()
    from patchcore_dist.config import load_config
    from patchcore_dist.fit import run_fit
    run_fit(a.train, a.model, load_config(a.config, a.overrides), reuse=a.reuse, validation=a.validation)


if __name__ == "__main__":
    sys.exit(main(run))
