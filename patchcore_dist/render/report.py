"""A self-contained static HTML report (images inlined as base64, a few lines of inline script to sort
the table): opens from a laptop or object storage, no server, no network."""
from __future__ import annotations

import base64
import functools
import html
import io

import numpy as np

from ..artifacts.inputs import category_entry, mask_uri
from .heatmap import COLOR_MAP
from .page import SORT_SCRIPT, STYLE, img_cell, link, overlay_uri, thumb, zoom, zoom_note


def _figure_png(fig) -> str:
    import matplotlib.pyplot as plt
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _histogram(rows: list[dict], threshold, name: str) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3), dpi=100)
    normal = [r["score"] for r in rows if r["label"] == 0]
    bad = [r["score"] for r in rows if r["label"] == 1]
    bins = np.linspace(min(r["score"] for r in rows), max(r["score"] for r in rows), 30)
    ax.hist(normal, bins=bins, alpha=0.6, label=f"normal ({len(normal)})", color="tab:blue")
    ax.hist(bad, bins=bins, alpha=0.6, label=f"anomalous ({len(bad)})", color="tab:red")
    if threshold is not None:
        ax.axvline(threshold, color="k", ls="--", label=name)
    ax.set_xlabel("image score")
    ax.set_ylabel("images")
    ax.legend()
    fig.tight_layout()
    return _figure_png(fig)


def colour_bar(lo: float, hi: float, threshold: float | None) -> str:
    """The heatmaps' colour scale as a labelled bar: score values at the cold end, the threshold and the hot end."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 1.5), dpi=100)
    ax.imshow(np.linspace(0, 1, 256)[None, :], aspect="auto", cmap=COLOR_MAP, extent=(lo, hi, 0, 1))
    ticks = [lo, hi] + ([threshold] if threshold is not None else [])
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{lo:.1f}\ntypical normal", f"{hi:.1f}"] +
                       ([f"{threshold:.1f}\nthreshold"] if threshold is not None else []))
    if threshold is not None:
        ax.axvline(threshold, color="k", lw=1.5)
    ax.set_yticks([])
    ax.set_xlabel("anomaly score (each heatmap's hottest pixel reads its image score)")
    fig.tight_layout()
    return _figure_png(fig)


def _fmt(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.3f}"


def _image_table(rows: list[dict], errors: list[dict], dataset: str, output: str, threshold) -> str:
    """Every test image: score, label, defect type, verdict at the threshold, heatmap link; then the errors."""
    body = []
    for r in sorted(rows, key=lambda r: -r["score"]):
        rel, defect, _ = category_entry(dataset, r["image"])
        label = "anomalous" if r["label"] else "normal"
        flagged = "" if threshold is None else ("above" if above(r["score"], threshold) else "below")
        body.append(f'<tr class="{label}"><td>{html.escape(rel)}</td><td class="num" data-v="{r["score"]:.6f}">'
                    f'{r["score"]:.3f}</td><td class="label">{label}</td><td>{html.escape(defect)}</td>'
                    f'<td>{flagged}</td><td></td><td>{link(r.get("heatmap"), output)}</td></tr>')
    for e in errors:
        rel, defect, _ = category_entry(dataset, e["image"])
        body.append(f'<tr><td>{html.escape(rel)}</td><td class="num" data-v="-1">n/a</td><td></td>'
                    f'<td>{html.escape(defect)}</td><td></td><td>{html.escape(e["error"])}</td><td></td></tr>')
    head = ("<thead><tr><th>image</th><th>score</th><th>label</th><th>defect type</th><th>vs threshold</th>"
            "<th>error</th><th>heatmap</th></tr></thead>")
    return f'<table class="sortable">{head}<tbody>{"".join(body)}</tbody></table>'


def _gallery(rows: list[dict], dataset: str, opts: dict, config) -> str:
    """A table of image | input | heatmap overlay | ground-truth mask for ``rows``, and a crop of the
    original at native resolution around the heatmap's hottest point for large or tiled images."""
    zooms = [zoom(r["image"], r.get("heatmap"), opts, config.image, force=config.tiling.enabled) for r in rows]
    zoomed = any(zooms)
    head = ("<tr><th>image</th><th>input</th><th>heatmap overlay</th><th>ground truth</th>"
            + ("<th>zoom</th>" if zoomed else "") + "</tr>")
    out = []
    for r, z in zip(rows, zooms):
        rel, defect, name = category_entry(dataset, r["image"])
        mask = "" if defect == "good" else thumb(mask_uri(dataset, defect, name), opts, config.image)
        overlay = thumb(overlay_uri(r.get("heatmap")), opts, config.image) or thumb(r.get("heatmap"), opts, config.image)
        cells = img_cell(thumb(r["image"], opts, config.image)) + img_cell(overlay) + img_cell(mask)
        out.append(f"<tr><td>{html.escape(rel)}<br>score {r['score']:.3f}<br>"
                   f"{'anomalous' if r['label'] else 'normal'}</td>{cells}{img_cell(z, 'zoom') if zoomed else ''}</tr>")
    note = f"<p>{zoom_note()}.</p>" if zoomed else ""
    return f"{note}<table>{head}{''.join(out)}</table>"


def _summary(metrics: dict, dataset: str, config) -> str:
    defects = "".join(f"<tr><td>{html.escape(k)}</td><td>{v['images']}</td><td>{_fmt(v['image_auroc'])}</td>"
                      f"<td>{_fmt(v['pixel_auroc'])}</td><td>{_fmt(v['pro'])}</td></tr>"
                      for k, v in metrics["per_defect"].items())
    return f"""<p>dataset <code>{html.escape(dataset)}</code>, model <code>{html.escape(metrics['model'])}</code>,
backbone <code>{html.escape(config.backbone.name)}</code>, {metrics['scored']} of {metrics['images']} test images scored</p>
<table><tr><th>image AUROC</th><th>pixel AUROC</th><th>PRO (FPR &le; 0.3)</th><th>F1-optimal threshold</th><th>F1</th></tr>
<tr><td>{_fmt(metrics['image_auroc'])}</td><td>{_fmt(metrics['pixel_auroc'])}</td><td>{_fmt(metrics['pro'])}</td>
<td>{_fmt(metrics['threshold'])}</td><td>{_fmt(metrics['f1'])}</td></tr></table>
<h2>Per defect type (each against all normal test images)</h2>
<table><tr><th>defect</th><th>images</th><th>image AUROC</th><th>pixel AUROC</th><th>PRO</th></tr>{defects}</table>"""


def _scale_section(metrics: dict) -> str:
    hm = metrics.get("heatmap") or {}
    if not hm:
        return ""
    lo, hi = hm["scale"]
    t = hm.get("threshold")
    where = (f"threshold {t:.3f} ({html.escape(hm['threshold_source'])}) at the centre of the scale"
             if t is not None else html.escape(hm.get("threshold_source", "")))
    return (f"<h2>Heatmap colour scale</h2><p>Colour map {COLOR_MAP}: blue = {lo:.3f} (the typical level of normal "
            f"images), {where}, red = {hi:.3f} and above. Fixed for the whole report.</p>"
            f"<img style='max-width:600px' src='{colour_bar(lo, hi, t)}'>")


def above(score: float, threshold: float) -> bool:
    """The verdict of the score table's ``is_anomaly``: above the threshold is strictly greater."""
    return score > threshold


def report_threshold(metrics: dict) -> tuple[float | None, str]:
    """The one threshold the report judges images by, and its name: the test set's F1-optimal threshold
    (the one its F1 is at); without one (one class only), the heatmap scale's centre."""
    if metrics.get("threshold") is not None:
        return metrics["threshold"], "F1-optimal threshold of this test set"
    hm = metrics.get("heatmap") or {}
    if hm.get("threshold") is not None:
        return hm["threshold"], hm.get("threshold_source") or "the heatmap scale's centre"
    return None, "none"


def _verdict_sections(rows: list[dict], threshold, n: int, dataset: str, opts: dict, config) -> str:
    """The worst-missed anomalous images (at or below the threshold, lowest first) and the false alarms
    (normal images above it, highest first), each a gallery or a sentence saying there are none."""
    if threshold is None:
        return "<h2>Missed anomalies and false alarms</h2><p>No threshold: no image can be called missed or a false alarm.</p>"
    t = f"{threshold:.3f}"
    gallery = functools.partial(_gallery, dataset=dataset, opts=opts, config=config)
    missed = sorted([r for r in rows if r["label"] == 1 and not above(r["score"], threshold)], key=lambda r: r["score"])
    false = sorted([r for r in rows if r["label"] == 0 and above(r["score"], threshold)], key=lambda r: -r["score"])
    return (f"<h2>Worst-missed anomalous images (at or below the threshold {t}, lowest scores first; {len(missed)})</h2>"
            + (gallery(missed[:n]) if missed else f"<p>None: every anomalous image scores above the threshold {t}.</p>")
            + f"<h2>False alarms (normal images above the threshold {t}, highest first; {len(false)})</h2>"
            + (gallery(false[:max(2, n // 2)]) if false else f"<p>None: no normal image scores above the threshold {t}.</p>"))


def render_report(metrics: dict, rows: list[dict], dataset: str, config, opts: dict, n: int = 8,
                  output: str = "") -> str:
    """The report page: metrics, score histogram, colour scale, a sortable table of every image, and
    galleries of the highest-scored, the worst-missed and the false-alarm images; every verdict at one
    threshold (:func:`report_threshold`), named on the page."""
    top = sorted(rows, key=lambda r: -r["score"])[:n]
    warns = "".join(f"<li>{html.escape(w)}</li>" for w in metrics["warnings"])
    threshold, name = report_threshold(metrics)
    judged = "" if threshold is None else (
        f"<p>Verdicts on this page (above / below, missed, false alarm) are at the {html.escape(name)} "
        f"{_fmt(threshold)}: an image is above it when its score is greater, as the score table's is_anomaly is "
        "(the F1 is computed with the same rule).</p>")
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>patchcore-dist report</title>
<style>{STYLE}</style></head><body>
<h1>PatchCore evaluation</h1>
{_summary(metrics, dataset, config)}
{judged}
<h2>Image scores</h2><img style="max-width:600px" src="{_histogram(rows, threshold, name)}">
{_scale_section(metrics)}
<h2>Highest-scored images</h2>{_gallery(top, dataset, opts, config)}
{_verdict_sections(rows, threshold, n, dataset, opts, config)}
<h2>Every image ({len(rows)} scored, {len(metrics['errors'])} errors; click a column to sort)</h2>
{_image_table(rows, metrics['errors'], dataset, output, threshold)}
{'<h2>Warnings</h2><ul>' + warns + '</ul>' if warns else ''}
<script>{SORT_SCRIPT}</script>
</body></html>"""


def write_product_index(output: str, results: dict, current: dict, opts: dict) -> str:
    """``<output>/index.html`` of ``evaluate --models``: one row per product (its current version, image
    and pixel AUROC, PRO, threshold, link to its report), or why it was not evaluated."""
    from ..artifacts import storage
    rows = []
    for name, m in sorted(results.items()):
        e = current[name]
        if "error" in m:
            cells = f"<td colspan='5'>not evaluated: {html.escape(m['error'])}</td>"
        else:
            cells = "".join(f"<td class='num'>{_fmt(m.get(k))}</td>" for k in ("image_auroc", "pixel_auroc", "pro",
                                                                                 "threshold"))
            cells += f"<td>{link(storage.join(output, name, 'report.html'), output, 'report')}</td>"
        rows.append(f"<tr><td>{html.escape(name)}</td><td><code>{html.escape(e['version'])}</code></td>{cells}</tr>")
    head = "".join(f"<th>{h}</th>" for h in ("product", "version", "image AUROC", "pixel AUROC", "PRO", "threshold",
                                             "report"))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>patchcore-dist catalogue evaluation</title>
<style>{STYLE}</style></head><body><h1>PatchCore evaluation: {len(results)} products</h1>
<table><tr>{head}</tr>{''.join(rows)}</table><script>{SORT_SCRIPT}</script></body></html>"""
    uri = storage.join(output, "index.html")
    storage.write_bytes(uri, page.encode(), **opts)
    return uri
