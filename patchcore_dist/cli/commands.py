"""The commands: fit, score, evaluate, maintain, synthesize, demo. Each has ``add_<name>_arguments(parser)`` and
``<name>(args)``; the `patchcore` command and the `patchcore-<name>` scripts share them. The jobs'
modules are imported when a command runs, so ``--help`` stays fast."""
from __future__ import annotations

import argparse

from ..errors import ConfigError, JobError
from .printing import g4, maintain_lines, table


def add_fit_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train", help="folder of normal images, or an MVTec AD category root")
    p.add_argument("--model", help="new model directory (local path, file:// or s3://)")
    p.add_argument("--products", help="instead of --train: a folder of product folders (each one as --train takes); "
                                      "one model per product, fitted in one job (needs --models)")
    p.add_argument("--models", help="with --products: the catalogue folder; each product's new version goes to "
                                    "MODELS/<product>/<version>/ and MODELS/catalog.json names the current ones")
    p.add_argument("--only", metavar="A,B", help="with --products: fit only these products")
    p.add_argument("--promote", choices=["better", "always"], default="better",
                   help="with --products and --validation VROOT (VROOT/<product>/ in MVTec layout): better (default) "
                        "makes a new version current only if its image AUROC is not below the current one's; always: "
                        "whatever it is")
    p.add_argument("--reuse", help="an earlier model: reuse its features of unchanged images")
    p.add_argument("--validation", help="normal images to calibrate the decision threshold on "
                                        "(else fit.holdout_fraction of the training images, if set)")
    p.add_argument("--exclude", metavar="LIST", help="training images to leave out: a text file of image URIs "
                   "(one a line) or a Parquet file with an 'image' column (e.g. reviewed rows of "
                   "train_outliers.parquet); recorded in the manifest")


def fit(a: argparse.Namespace) -> None:
    if a.products or a.models:
        return fit_products(a)
    if not (a.train and a.model):
        raise ConfigError("fit needs --train and --model (one model), or --products and --models (a catalogue)")
    from ..config import load_config
    from ..pipeline.fit import run_fit
    run_fit(a.train, a.model, load_config(a.config, a.overrides), reuse=a.reuse, validation=a.validation,
            exclude=a.exclude)


def fit_products(a: argparse.Namespace) -> None:
    """``fit --products ROOT --models OUT``: one model per product, the catalogue updated."""
    from ..pipeline.products import run_fit_products
    if not (a.products and a.models) or a.train or a.model or a.reuse or a.exclude:
        raise ConfigError("fit --products needs --models and takes neither --train, --model, --reuse nor --exclude")
    done = run_fit_products(a.products, a.models, a.config, a.overrides, only=a.only, validation=a.validation,
                            promote=a.promote)
    print(format_catalog(done["catalog"]))


def format_catalog(cat: dict) -> str:
    """The catalogue as a table: one row per product, its current version and the last refused one."""
    rows = []
    for name, e in sorted(cat["products"].items()):
        p, r = e.get("promotion") or {}, e.get("refused") or {}
        note = f"refused {r['version']} (AUROC {r['promotion']['new_auroc']:.3f} < {r['promotion']['current_auroc']:.3f})" \
            if r.get("promotion") else ""
        rows.append([name, e["version"], e["digest"][:12], e["fitted"], e["images"], g4(e.get("threshold")),
                     "" if not p else f"{p['new_auroc']:.3f}", len(e.get("previous", [])), note])
    return table(["product", "version", "digest", "fitted", "images", "threshold", "AUROC", "previous", "note"], rows,
                 [False, False, False, False, True, True, True, True, False]) if rows else "the catalogue is empty"


def add_catalog_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["list", "rollback"], help="list: print the catalogue; rollback PRODUCT: make "
                                                                 "the product's previous version current again")
    p.add_argument("product", nargs="?", help="rollback: the product")
    p.add_argument("--models", required=True, help="the catalogue folder written by fit --products")


def catalog(a: argparse.Namespace) -> None:
    from ..artifacts import catalog as cat
    from ..config import load_config
    opts = load_config(a.config, a.overrides).storage.options()
    if a.action == "rollback":
        if not a.product:
            raise ConfigError("catalog rollback needs the product: patchcore catalog rollback PRODUCT --models OUT")
        new = cat.update_catalog(a.models, cat.rollback(a.product), opts)
        e = new["products"][a.product]
        print(f"{a.product}: version {e['version']} is current again ({e['model']}); "
              f"{e['rolled_back_from']['version']} rolled back")
        return
    print(format_catalog(cat.read_catalog(a.models, opts)))


def add_score_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model directory written by fit")
    p.add_argument("--models", help="instead of --model: a catalogue folder written by fit --products; the images "
                                    "under IMAGES/<product>/ are scored with that product's current model")
    p.add_argument("--images", required=True,
                   help="folder of images to score, or a manifest: a .parquet / .csv file with an 'image' column of "
                        "URIs (optional size, mtime, etag: used as the files' statistics)")
    p.add_argument("--images-root", help="every image (of a manifest, or the folder) must lie under this folder or "
                                         "prefix; an image outside it is an error row")
    p.add_argument("--output", required=True, help="where the score table and heatmaps go")
    p.add_argument("--rescore", choices=["changed", "all"], default="changed",
                   help="changed (default): skip images this model already scored; all: score everything again")
    p.add_argument("--dry-run", action="store_true",
                   help="list and plan only: print how many images are new, changed, unchanged and refused; write "
                        "nothing")


def score(a: argparse.Namespace) -> None:
    if bool(a.model) == bool(a.models):
        raise ConfigError("score needs --model (one model) or --models (a catalogue), not both")
    if a.models:
        return score_products(a)
    from ..pipeline.score import run_score
    s = run_score(a.model, a.images, a.output, a.config, a.overrides, rescore=a.rescore,
                  images_root=a.images_root, dry_run=a.dry_run)
    if a.dry_run:
        print(dry_run_line(s))
        return
    print(f"review page: {s['review']}" + ("" if s["flagged"] else " (no image flagged)"))
    for r in s["flagged"][:5]:
        print(f"  flagged  score {r['score']:.3f}  {r['image']}")


def score_products(a: argparse.Namespace) -> None:
    """``score --models OUT --images AROOT``: each product folder with its current model."""
    from ..pipeline.routing import run_score_products
    if a.dry_run or a.images_root:
        raise ConfigError("score --models takes neither --dry-run nor --images-root (yet)")
    r = run_score_products(a.models, a.images, a.output, a.config, a.overrides, rescore=a.rescore)
    print(format_product_counts(r["products"]))
    print(f"review page: {r['review']}")
    missing = sorted(n for n, p in r["products"].items() if p["model"] is None)
    if missing:
        raise JobError(f"no model in the catalogue {a.models} for the product folders {', '.join(missing)}: their "
                       "images are error rows; fit them with fit --products ... --only NAME")


def format_product_counts(products: dict) -> str:
    """A run's per-product counts as a table."""
    return table(["product", "model", "images", "scored", "skipped", "errors"],
                 [[n, (p["model"] or "NONE IN THE CATALOGUE")[:12], p["images_listed"], p["scored"], p["skipped"],
                   p["errors"]] for n, p in sorted(products.items())], [False, False, True, True, True, True])


def dry_run_line(s: dict) -> str:
    """What `score --dry-run` prints: the plan's counts, in one line."""
    given = f" (the manifest gave {s['given']} URIs)" if s.get("given") is not None else ""
    return (f"dry run: {s['images']} images{given}: {s['new']} new, {s['changed']} changed, {s['unchanged']} "
            f"unchanged, {s['refused']} refused; nothing written to {s['output']}")


def add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model directory written by fit")
    p.add_argument("--models", help="instead of --model: a catalogue folder (fit --products); each product's current "
                                    "model is evaluated on DATASET/<product>/ into OUTPUT/<product>/, and "
                                    "OUTPUT/index.html lists them")
    p.add_argument("--dataset", required=True, help="MVTec AD category root (train/, test/, ground_truth/)")
    p.add_argument("--output", required=True, help="where metrics.json, report.html, scores and heatmaps go")


def evaluate(a: argparse.Namespace) -> None:
    if bool(a.model) == bool(a.models):
        raise ConfigError("evaluate needs --model (one model) or --models (a catalogue), not both")
    if a.models:
        return evaluate_products(a)
    from ..pipeline.evaluate import run_evaluate
    m = run_evaluate(a.model, a.dataset, a.output, a.config, a.overrides)
    print(f"image AUROC {m['image_auroc']:.3f}  pixel AUROC {m['pixel_auroc']:.3f}  PRO {m['pro']:.3f}  "
          f"threshold {g4(m['threshold'])}  ->  {a.output}/metrics.json, {a.output}/report.html")


def evaluate_products(a: argparse.Namespace) -> None:
    """``evaluate --models OUT --dataset VROOT``: every catalogued product on its folder."""
    from ..pipeline.routing import run_evaluate_products
    results = run_evaluate_products(a.models, a.dataset, a.output, a.config, a.overrides)
    rows = [[n, None, None, None, m["error"]] if "error" in m else
            [n, g4(m["image_auroc"]), g4(m["pixel_auroc"]), g4(m["pro"]), f"{a.output}/{n}/report.html"]
            for n, m in sorted(results.items())]
    print(table(["product", "image AUROC", "pixel AUROC", "PRO", "report"], rows, [False, True, True, True, False]))
    print(f"index: {a.output}/index.html")
    failed = sorted(n for n, m in results.items() if "error" in m)
    if failed:
        raise JobError(f"{len(failed)} of {len(results)} products not evaluated: {', '.join(failed)} (above)")


def add_maintain_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", required=True, help="a score / evaluate output (holding scores/ and patch_scores/)")
    p.add_argument("--vacuum-hours", type=_hours, default=None, metavar="H",
                   help="also delete the tables' data files that no version of the last H hours needs (time travel "
                        "before that ends) and their leftover data files (of crashed runs) older than H hours; H: a "
                        "positive number of hours, a fraction rounded up to whole hours. No other file in the tables' "
                        "folders is ever deleted")
    p.add_argument("--repair", action="store_true",
                   help="drop data files that are missing (deleted after a corruption) from the tables")


def _hours(text: str) -> float:
    """--vacuum-hours: a positive, finite number of hours (argparse turns the refusal into one error line)."""
    import math
    try:
        hours = float(text)
    except ValueError:
        hours = math.nan
    if not math.isfinite(hours) or hours <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of hours (e.g. 168 for 7 days; "
                                         "a fraction is rounded up to whole hours)")
    return hours


def maintain(a: argparse.Namespace) -> None:
    from ..artifacts.scores import maintain as run_maintain
    from ..config import load_config
    done = run_maintain(a.output, load_config(a.config, a.overrides).storage.options(), a.vacuum_hours, a.repair)
    print("\n".join(maintain_lines(a.output, done)))


def add_synthesize_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--normal", help="folder of normal images")
    src.add_argument("--photo", help="a scikit-image texture (brick, gravel, grass): a high-resolution category of "
                                     "native-scale mosaics of it")
    p.add_argument("--output", required=True, help="new category root")
    p.add_argument("--kinds", default="scratch,stain,foreign,hole,deformation",
                   help="defect kinds to inject, comma-separated (default: all five)")
    p.add_argument("--test-fraction", type=float, default=0.3,
                   help="share of the normal images held out for test/good and the defects (default 0.3)")
    p.add_argument("--defects-per-kind", type=int, default=None,
                   help="defective test images per kind (default: about the test images / the kinds, plus one)")
    p.add_argument("--defect-size", type=_size_range, default=None,
                   help="defect extent in pixels, MIN-MAX (e.g. 10-40); default: fractions of the image "
                        "(10-40 with --photo)")
    p.add_argument("--image-size", type=int, default=1024, help="--photo: side of the images, pixels")
    p.add_argument("--images", type=int, default=20, help="--photo: normal images to make")


def _size_range(text: str) -> tuple[float, float]:
    lo, sep, hi = text.partition("-")
    try:
        lo_f, hi_f = float(lo), float(hi if sep else lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not MIN-MAX pixels, e.g. 10-40") from None
    if not 1 <= lo_f <= hi_f:
        raise argparse.ArgumentTypeError(f"{text!r}: need 1 <= MIN <= MAX")
    return lo_f, hi_f


def synthesize(a: argparse.Namespace) -> None:
    from ..config import load_config
    from ..synthetic.categories import describe, make_highres_category, synthesize_folder
    cfg = load_config(a.config, a.overrides)
    kinds = a.kinds.split(",")
    if a.photo:
        counts = make_highres_category(a.output, a.photo, a.images, a.image_size, a.defect_size or (10, 40), kinds,
                                       cfg.seed, cfg.storage.options(), a.test_fraction, a.defects_per_kind)
    else:
        counts = synthesize_folder(a.normal, a.output, kinds, a.test_fraction, a.defects_per_kind,
                                   cfg.seed, cfg.storage.options(), cfg.image.max_pixels, a.defect_size)
    print(f"wrote {a.output}: {describe(counts)}")


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", default="demo_out", help="folder of the demo's data, models and results "
                                                         "(default demo_out; reused by the next run)")
    p.add_argument("--categories", default="brick,gravel,coffee",
                   help="scikit-image photographs to build categories of, comma-separated (default brick,gravel,coffee)")
    p.add_argument("--images", type=int, default=24, help="normal images per category")


def demo(a: argparse.Namespace) -> None:
    from .demo import run_demo
    run_demo(a.output, [c.strip() for c in a.categories.split(",") if c.strip()], a.images, a.overrides, a.config)


def add_runs_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", required=True, help="a score output (or a model directory, for its fit)")
    p.add_argument("--last", type=int, default=10, help="how many of the latest runs (default 10)")


def runs(a: argparse.Namespace) -> None:
    from ..artifacts.runs import printable, read_runs
    from ..config import load_config
    records = read_runs(a.output, load_config(a.config, a.overrides).storage.options())[-a.last:]
    print(format_runs(printable(records)) if records else f"no runs recorded under {printable(a.output)}")


# (header, right-aligned): numbers right-aligned; each column as wide as its header and widest cell
RUN_COLUMNS = (("started", False), ("job", False), ("model", False), ("listed", True), ("scored", True),
               ("skipped", True), ("errors", True), ("anomalies", True), ("p99", True), ("img/s", True),
               ("note", False))


def _run_cells(r: dict) -> list:
    """One run record's cells, in RUN_COLUMNS order (missing fields empty); errors by reason and drift
    warnings as notes."""
    q = r.get("score_quantiles") or {}
    rate = r.get("anomaly_rate")
    notes = [f"{n} x {reason}" for reason, n in (r.get("errors_by_reason") or {}).items()]
    if (r.get("drift") or {}).get("warning"):
        notes.insert(0, f"DRIFT: {100 * r['drift']['share_above']:.1f}% above normal p99")
    if r.get("error"):
        notes.insert(0, r["error"])
    if isinstance(r.get("products"), dict):
        notes.insert(0, "products: " + ", ".join(f"{n} {p.get('scored')}/{p.get('skipped')}/{p.get('errors')}"
                                                 for n, p in sorted(r["products"].items()) if isinstance(p, dict))
                     + " (scored/skipped/errors)")
    return [r.get("started"), r.get("job"), r.get("model"), r.get("images_listed"), r.get("scored"),
            r.get("skipped"), r.get("errors"), None if rate is None else f"{r.get('anomalies')} ({100 * rate:.1f}%)",
            g4(q["p99"]) if q.get("p99") is not None else None, r.get("images_per_s"), "; ".join(notes)]


def format_runs(records: list[dict]) -> str:
    """Run records as a table, oldest first."""
    return table([h for h, _ in RUN_COLUMNS], [_run_cells(r) for r in records], [right for _, right in RUN_COLUMNS])


COMMANDS = {
    "fit": (add_fit_arguments, fit, "fit a PatchCore model on normal images"),
    "score": (add_score_arguments, score, "score an image archive: score table + heatmaps (incremental)"),
    "evaluate": (add_evaluate_arguments, evaluate, "evaluate a model on an MVTec-layout category: metrics + report"),
    "maintain": (add_maintain_arguments, maintain,
                 "score table maintenance: convert old Parquet parts, compact, repair, vacuum"),
    "synthesize": (add_synthesize_arguments, synthesize,
                   "turn normal images into an MVTec-layout validation category with synthetic defects"),
    "demo": (add_demo_arguments, demo, "build the demo benchmark from real photographs, fit, score and evaluate it"),
    "catalog": (add_catalog_arguments, catalog, "list a model catalogue, or roll a product back to its previous "
                                                "version"),
    "runs": (add_runs_arguments, runs, "list the latest fit / score runs recorded under an output"),
}
