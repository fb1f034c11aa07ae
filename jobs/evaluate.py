"""Evaluate a model on an MVTec-layout category:
python jobs/evaluate.py --model URI --dataset URI --output URI [--config F] [k=v ...]"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from patchcore_dist.cli import main, parser  # noqa: E402


def run():
    p = parser(__doc__)
    p.add_argument("--model", required=True, help="model directory written by fit")
    p.add_argument("--dataset", required=True, help="MVTec AD category root (train/, test/, ground_truth/)")
    p.add_argument("--output", required=True, help="where metrics.json, report.html, scores and heatmaps go")
    a = p.parse_args()
    from patchcore_dist.evaluate import run_evaluate
    m = run_evaluate(a.model, a.dataset, a.output, a.config, a.overrides)
    print(f"image AUROC {m['image_auroc']:.3f}  pixel AUROC {m['pixel_auroc']:.3f}  PRO {m['pro']:.3f}  "
          f"threshold {m['threshold']}  ->  {a.output}/metrics.json, {a.output}/report.html")


if __name__ == "__main__":
    sys.exit(main(run))
