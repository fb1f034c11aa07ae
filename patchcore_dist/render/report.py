"""A self-contained static HTML report (images inlined as base64, a few lines of inline script to sort
the table): opens from a laptop or object storage, no server, no network."""
from __future__ import annotations

import base64
import html
import io
import os

import numpy as np
from PIL import Image

from ..artifacts import storage
from ..artifacts.inputs import category_entry, mask_uri
from ..core.preprocessing import decode_sized
from ..errors import ImageError, StorageError
from .heatmap import COLOR_MAP, encode

STYLE = """body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin-bottom:1em}
td,th{border:1px solid #ccc;padding:4px;vertical-align:top}img{max-width:200px}
table.sortable th{cursor:pointer;background:#f3f3f3}table.sortable th:after{content:" \\2195";color:#999}
tr.anomalous td.label{color:#b00}td.num{text-align:right;font-variant-numeric:tabular-nums}"""

# Sorts a table.sortable by the clicked column (numbers numerically); toggles the direction.
SORT_SCRIPT = """document.querySelectorAll('table.sortable th').forEach(function(th, col){
 th.addEventListener('click', function(){
  var body = th.closest('table').tBodies[0], rows = Array.from(body.rows), asc = th.dataset.asc !== '1';
  th.dataset.asc = asc ? '1' : '0';
  rows.sort(function(a, b){
   var x = a.cells[col].dataset.v !== undefined ? a.cells[col].dataset.v : a.cells[col].textContent;
   var y = b.cells[col].dataset.v !== undefined ? b.cells[col].dataset.v : b.cells[col].textContent;
   var nx = parseFloat(x), ny = parseFloat(y);
   var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
   return asc ? c : -c;});
  rows.forEach(function(r){ body.appendChild(r); });});});"""


def _b64_png(img: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(encode(np.asarray(img))).decode()


def _thumb(uri: str | None, opts: dict, image_config, size: int = 200) -> str:
    """A thumbnail of an input, heatmap or mask, decoded within the image limits (allowed formats only,
    ``image.max_bytes`` / ``image.max_pixels``); "" when there is none or it cannot be shown."""
    if not uri:
        return ""
    try:
        data = storage.read_bytes(uri, **opts, limit=image_config.max_bytes + 1)
        if len(data) > image_config.max_bytes:
            return ""
        rgb, _ = decode_sized(data, image_config.max_pixels, min_side=1, shorter_side=size)
    except (FileNotFoundError, ImageError, StorageError):
        return ""
    img = Image.fromarray(rgb)
    img.thumbnail((size, size))
    return _b64_png(img)


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


def _histogram(rows: list[dict], threshold) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3), dpi=100)
    normal = [r["score"] for r in rows if r["label"] == 0]
    bad = [r["score"] for r in rows if r["label"] == 1]
    bins = np.linspace(min(r["score"] for r in rows), max(r["score"] for r in rows), 30)
    ax.hist(normal, bins=bins, alpha=0.6, label=f"normal ({len(normal)})", color="tab:blue")
    ax.hist(bad, bins=bins, alpha=0.6, label=f"anomalous ({len(bad)})", color="tab:red")
    if threshold is not None:
        ax.axvline(threshold, color="k", ls="--", label="F1-optimal threshold")
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


def _link(uri: str | None, base: str) -> str:
    """A link to a heatmap: relative to the report's folder when it lies below it, else the URI."""
    if not uri:
        return "<i>none</i>"
    href = uri
    if not storage.is_s3(uri) and not storage.is_s3(base):
        rel = os.path.relpath(uri.removeprefix("file://"), base.removeprefix("file://"))
        href = rel if not rel.startswith("..") else uri
    return f'<a href="{html.escape(href)}">heatmap</a>'


def _image_table(rows: list[dict], errors: list[dict], dataset: str, output: str, threshold) -> str:
    """Every test image: score, label, defect type, verdict at the threshold, heatmap link; then the errors."""
    body = []
    for r in sorted(rows, key=lambda r: -r["score"]):
        rel, defect, _ = category_entry(dataset, r["image"])
        label = "anomalous" if r["label"] else "normal"
        flagged = "" if threshold is None else ("above" if r["score"] >= threshold else "below")
        body.append(f'<tr class="{label}"><td>{html.escape(rel)}</td><td class="num" data-v="{r["score"]:.6f}">'
                    f'{r["score"]:.3f}</td><td class="label">{label}</td><td>{html.escape(defect)}</td>'
                    f'<td>{flagged}</td><td></td><td>{_link(r.get("heatmap"), output)}</td></tr>')
    for e in errors:
        rel, defect, _ = category_entry(dataset, e["image"])
        body.append(f'<tr><td>{html.escape(rel)}</td><td class="num" data-v="-1">n/a</td><td></td>'
                    f'<td>{html.escape(defect)}</td><td></td><td>{html.escape(e["error"])}</td><td></td></tr>')
    head = ("<thead><tr><th>image</th><th>score</th><th>label</th><th>defect type</th><th>vs threshold</th>"
            "<th>error</th><th>heatmap</th></tr></thead>")
    return f'<table class="sortable">{head}<tbody>{"".join(body)}</tbody></table>'


def _gallery(rows: list[dict], dataset: str, opts: dict, config) -> str:
    """A table of image | heatmap overlay | ground-truth mask for ``rows``."""
    head = "<tr><th>image</th><th>input</th><th>heatmap overlay</th><th>ground truth</th></tr>"
    out = []
    for r in rows:
        rel, defect, name = category_entry(dataset, r["image"])
        overlay = r["heatmap"][:-4] + "_overlay.jpg" if r.get("heatmap") else None
        mask = "" if defect == "good" else _thumb(mask_uri(dataset, defect, name), opts, config.image)
        cells = [_thumb(r["image"], opts, config.image),
                 _thumb(overlay, opts, config.image) or _thumb(r.get("heatmap"), opts, config.image), mask]
        imgs = "".join(f"<td>{'<img src=' + repr(c) + '>' if c else '<i>none</i>'}</td>" for c in cells)
        out.append(f"<tr><td>{html.escape(rel)}<br>score {r['score']:.3f}<br>"
                   f"{'anomalous' if r['label'] else 'normal'}</td>{imgs}</tr>")
    return f"<table>{head}{''.join(out)}</table>"


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


def render_report(metrics: dict, rows: list[dict], dataset: str, config, opts: dict, n: int = 8,
                  output: str = "") -> str:
    """The report page: metrics, score histogram, colour scale, a sortable table of every image, and
    galleries of the highest-scored, the worst-missed and the false-alarm images."""
    top = sorted(rows, key=lambda r: -r["score"])[:n]
    missed = sorted([r for r in rows if r["label"] == 1], key=lambda r: r["score"])[:n]
    false_alarms = sorted([r for r in rows if r["label"] == 0], key=lambda r: -r["score"])[: max(2, n // 2)]
    warns = "".join(f"<li>{html.escape(w)}</li>" for w in metrics["warnings"])
    threshold = (metrics.get("heatmap") or {}).get("threshold", metrics["threshold"])
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>patchcore-dist report</title>
<style>{STYLE}</style></head><body>
<h1>PatchCore evaluation</h1>
{_summary(metrics, dataset, config)}
<h2>Image scores</h2><img style="max-width:600px" src="{_histogram(rows, metrics['threshold'])}">
{_scale_section(metrics)}
<h2>Highest-scored images</h2>{_gallery(top, dataset, opts, config)}
<h2>Worst-missed anomalous images (lowest scores)</h2>{_gallery(missed, dataset, opts, config)}
<h2>Highest-scored normal images (false alarms)</h2>{_gallery(false_alarms, dataset, opts, config)}
<h2>Every image ({len(rows)} scored, {len(metrics['errors'])} errors; click a column to sort)</h2>
{_image_table(rows, metrics['errors'], dataset, output, threshold)}
{'<h2>Warnings</h2><ul>' + warns + '</ul>' if warns else ''}
<script>{SORT_SCRIPT}</script>
</body></html>"""
