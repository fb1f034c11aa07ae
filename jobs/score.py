"""Score images with a model: python jobs/score.py --model URI --images URI --output URI [--config F] [k=v ...]"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from patchcore_dist.cli import main, parser  # noqa: E402


def run():
    p = parser(__doc__)
    p.add_argument("--model", required=True, help="model directory written by fit")
    p.add_argument("--images", required=True, help="folder of images to score")
    p.add_argument("--output", required=True, help="where the score table and heatmaps go")
    p.add_argument("--rescore", choices=["changed", "all"], default="changed",
                   help="changed (default): skip images this model already scored; all: score everything again")
    a = p.parse_args()
    from patchcore_dist.score import run_score
    run_score(a.model, a.images, a.output, a.config, a.overrides, rescore=a.rescore)


if __name__ == "__main__":
    sys.exit(main(run))
