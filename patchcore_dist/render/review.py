"""The review page of a score run (``<output>/review.html``): what the run did (counts, errors by
reason), the model's decision threshold and where it came from, the highest-scored flagged images with
their overlays (and, for large or tiled images, a crop at native resolution around the heatmap's
hottest point), a sortable table of every flagged image of the model in the table, and its error rows.

Self-contained like the evaluation report: images inlined as base64, links relative to the page's
folder for local outputs. The score table is read in bounded batches of the few columns the page
shows (:func:`~patchcore_dist.artifacts.scores.top_rows`): memory does not grow with the table."""
from __future__ import annotations

import html

import pyarrow as pa
import pyarrow.compute as pc

from ..artifacts import storage
from ..artifacts.scores import top_rows
from ..core import calibration
from .page import SORT_SCRIPT, STYLE, img_cell, link, overlay_uri, thumb, zoom, zoom_note

TOP_N = 12            # flagged images shown with thumbnails
TABLE_ROWS = 2000     # flagged images in the sortable table at most
ERROR_ROWS = 100      # error rows listed at most
COLUMNS = ["image", "score", "normalized_score", "is_anomaly", "heatmap", "error"]
BY_SCORE = [("score", "descending"), ("image", "ascending")]


def threshold_source(stats: dict, threshold: float | None) -> str:
    """Where the decision threshold ``threshold`` a run compared with came from, in words (the model's
    manifest ``stats``)."""
    if threshold is None:
        return "none: a model fitted before decision thresholds and heatmap scales were calibrated"
    if stats.get("threshold") is None:
        return ("the centre of the model's heatmap scale, " + str(stats.get("heatmap_threshold_source", "")) +
                ": a model fitted before every fit calibrated a threshold")
    if all(k in stats for k in ("threshold_source", "threshold_images", "calibration_fpr", "fpr_resolution")):
        return calibration.describe_threshold(stats)[0]
    return str(stats.get("threshold_source") or "the model's calibrated threshold")


def review_rows(output: str, model: str, opts: dict, top_n: int = TOP_N, cap: int = TABLE_ROWS) -> dict:
    """What the page shows of the table (this model's rows): the flagged rows (``is_anomaly`` true, up
    to ``cap``, highest score first) and how many there are; the ``top_n`` shown with thumbnails (the
    highest-scored of all scored rows when none is flagged); the first error rows and how many."""
    (flagged, n_flagged), (by_score, _), (errors, n_errors) = top_rows(output, opts, model, COLUMNS, [
        (pc.field("is_anomaly"), BY_SCORE, cap), (pc.field("score").is_valid(), BY_SCORE, top_n),
        (pc.field("error").is_valid(), [("image", "ascending")], ERROR_ROWS)])
    top = flagged.slice(0, top_n) if n_flagged else by_score
    return {"flagged": flagged, "n_flagged": n_flagged, "top": top, "errors": errors, "n_errors": n_errors}


def write_review(output: str, record: dict, stats: dict, config, top_n: int = TOP_N) -> dict:
    """Write ``<output>/review.html`` for the run ``record`` (its run record) of a model with the
    manifest ``stats``. Returns its URI (``review``) and the highest-scored flagged images of the
    model in the table (``flagged``: image, score; up to ``top_n``)."""
    opts = config.storage.options()
    uri = storage.join(output, "review.html")
    rows = review_rows(output, record["model"], opts, top_n)
    page = render_review(record, threshold_source(stats, record.get("threshold")), rows, config, opts, output)
    storage.write_bytes(uri, page.encode(), **opts)
    return {"review": uri, "flagged": rows["flagged"].slice(0, top_n).select(["image", "score"]).to_pylist()}


def _name(uri: str, inputs: str) -> str:
    prefix = inputs.rstrip("/") + "/" if inputs else ""
    return uri[len(prefix):] if prefix and uri.startswith(prefix) else uri


def _num(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _v(x) -> str:
    """A sort key for the table script (empty: sorts as text, after numbers)."""
    return "" if x is None else f"{x:.6f}"


def _run_section(record: dict, source: str) -> str:
    t = record.get("threshold")
    rate = record.get("anomaly_rate")
    drift = record.get("drift") or {}
    cells = [("images listed", record["images_listed"]), ("scored", record["scored"]),
             ("skipped as unchanged", record["skipped"]), ("errors", record["errors"]),
             ("flagged this run", "n/a" if rate is None else f"{record['anomalies']} ({100 * rate:.1f}%)")]
    head = "".join(f"<th>{k}</th>" for k, _ in cells)
    body = "".join(f'<td class="num">{v}</td>' for _, v in cells)
    reasons = "".join(f"<tr><td>{html.escape(r)}</td><td class='num'>{n}</td></tr>"
                      for r, n in (record.get("errors_by_reason") or {}).items())
    warn = (f"<p><b>Drift:</b> {100 * drift['share_above']:.1f}% of this run's images score above the model's normal "
            f"p99 image score (normal images: about {100 * drift['expected']:.1f}%).</p>" if drift.get("warning") else "")
    return f"""<p>model <code>{html.escape(record['model'])}</code> (<code>{html.escape(record.get('model_uri', ''))}</code>),
images <code>{html.escape(record.get('inputs', ''))}</code>, run <code>{html.escape(record['run_id'])}</code>
({html.escape(str(record.get('started', '')))} to {html.escape(str(record.get('ended', '')))})</p>
<table><tr>{head}</tr><tr>{body}</tr></table>
<p>Decision threshold: <b>{'none' if t is None else f'{t:.3f}'}</b> ({html.escape(source)}); an image is flagged
when its score is above it.</p>{warn}
{'<h2>Errors of this run by reason</h2><table><tr><th>reason</th><th>images</th></tr>' + reasons + '</table>'
 if reasons else ''}"""


def _links(r: dict, base: str, overlay: bool) -> str:
    """Links to the image, its heatmap PNG and (``overlay``: output.overlay is on) its overlay JPEG."""
    return " ".join([link(r["image"], base, "image"), link(r.get("heatmap"), base, "heatmap")]
                    + ([link(overlay_uri(r.get("heatmap")), base, "overlay")] if overlay else []))


def _gallery(rows: list[dict], record: dict, config, opts: dict, base: str) -> str:
    """The top images: name, score, links | input | overlay | zoomed crop (large or tiled images)."""
    zooms = [zoom(r["image"], r.get("heatmap"), opts, config.image, force=config.tiling.enabled) for r in rows]
    zoomed = any(zooms)
    out = []
    for r, z in zip(rows, zooms):
        norm = f"<br>normalized {_num(r['normalized_score'])}" if "normalized_score" in r else ""
        overlay = thumb(overlay_uri(r.get("heatmap")), opts, config.image) or thumb(r.get("heatmap"), opts, config.image)
        out.append(f"<tr><td>{html.escape(_name(r['image'], record.get('inputs', '')))}<br>score {_num(r['score'])}"
                   f"{norm}<br>{_links(r, base, config.output.overlay)}</td>{img_cell(thumb(r['image'], opts, config.image))}"
                   f"{img_cell(overlay)}{img_cell(z, 'zoom') if zoomed else ''}</tr>")
    head = "<tr><th>image</th><th>input</th><th>heatmap overlay</th>" + ("<th>zoom</th>" if zoomed else "") + "</tr>"
    note = f"<p>{zoom_note()}.</p>" if zoomed else ""
    return f"{note}<table>{head}{''.join(out)}</table>"


def _top_section(rows: dict, record: dict, config, opts: dict, base: str) -> str:
    top = rows["top"].to_pylist()
    if rows["n_flagged"]:
        title = f"The {len(top)} highest-scored flagged images (of {rows['n_flagged']})"
        why = ""
    elif record.get("threshold") is None:
        title, why = "Highest-scored images", "<p>No threshold: nothing flagged; showing the highest scores.</p>"
    else:
        title = "Highest-scored images"
        why = (f"<p>Nothing flagged: no image of this model in the table scores above the threshold "
               f"{record['threshold']:.3f}; showing the highest scores.</p>")
    if not top:
        return f"<h2>{title}</h2>{why}<p>No scored images in the table.</p>"
    return f"<h2>{title}</h2>{why}{_gallery(top, record, config, opts, base)}"


def _flagged_table(rows: dict, record: dict, base: str, overlay: bool) -> str:
    """Every flagged image (up to the cap) as a sortable table."""
    t: pa.Table = rows["flagged"]
    n = rows["n_flagged"]
    if not n:
        return ""
    norm = "normalized_score" in t.column_names
    body = []
    for r in t.to_pylist():
        ns = f'<td class="num" data-v="{_v(r["normalized_score"])}">{_num(r["normalized_score"])}</td>' if norm else ""
        body.append(f'<tr><td>{html.escape(_name(r["image"], record.get("inputs", "")))}</td>'
                    f'<td class="num" data-v="{r["score"]:.6f}">{r["score"]:.3f}</td>{ns}'
                    f'<td>{_links(r, base, overlay)}</td></tr>')
    head = "<th>image</th><th>score</th>" + ("<th>normalized score</th>" if norm else "") + "<th>files</th>"
    more = f"<p>{n - t.num_rows} more flagged images are not listed (the {t.num_rows} highest-scored are).</p>" \
        if n > t.num_rows else ""
    return (f"<h2>Every flagged image of this model in the table ({n}; click a column to sort)</h2>"
            f'<table class="sortable"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>{more}')


def _error_table(rows: dict, record: dict) -> str:
    t: pa.Table = rows["errors"]
    n = rows["n_errors"]
    if not n:
        return "<h2>Errors</h2><p>No image of this model in the table has an error.</p>"
    body = "".join(f"<tr><td>{html.escape(_name(r['image'], record.get('inputs', '')))}</td>"
                   f"<td>{html.escape(r['error'])}</td></tr>" for r in t.to_pylist())
    more = f"<p>{n - t.num_rows} more error rows are not listed.</p>" if n > t.num_rows else ""
    return (f"<h2>Error rows of this model in the table ({n})</h2><table><tr><th>image</th><th>error</th></tr>"
            f"{body}</table>{more}")


def render_review(record: dict, source: str, rows: dict, config, opts: dict, base: str) -> str:
    """The review page of the run ``record`` (its run record): ``source`` says where the threshold came
    from, ``rows`` is :func:`review_rows`, ``base`` the page's folder (links are relative to it)."""
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>patchcore-dist score review</title>
<style>{STYLE}</style></head><body>
<h1>PatchCore score run</h1>
{_run_section(record, source)}
{_top_section(rows, record, config, opts, base)}
{_flagged_table(rows, record, base, config.output.overlay)}
{_error_table(rows, record)}
<script>{SORT_SCRIPT}</script>
</body></html>"""


def write_product_review(output: str, record: dict, sections: list[tuple], opts: dict) -> str:
    """``<output>/review.html`` of a ``score --models`` run (``record``: the job's run record): a table of
    the products' counts, then one section per scored product (``sections``: (product, its run record,
    its model's stats, its config)) as a single-model page shows it. Returns the page's URI."""
    head = "".join(f"<th>{h}</th>" for h in ("product", "model", "images", "scored", "skipped", "errors"))
    body = "".join(f"<tr><td>{html.escape(n)}</td><td><code>{html.escape(str(p['model'] or 'none in the catalogue'))}"
                   f"</code></td>" + "".join(f"<td class='num'>{p[k]}</td>" for k in
                                            ("images_listed", "scored", "skipped", "errors")) + "</tr>"
                   for n, p in sorted(record["products"].items()))
    parts = []
    for name, rec, stats, config in sections:
        rows = review_rows(output, rec["model"], opts)
        parts.append(f"<h2 id='{html.escape(name)}'>Product {html.escape(name)}</h2>"
                     + _run_section(rec, threshold_source(stats, rec.get("threshold")))
                     + _top_section(rows, rec, config, opts, output)
                     + _flagged_table(rows, rec, output, config.output.overlay) + _error_table(rows, rec))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>patchcore-dist score review</title>
<style>{STYLE}</style></head><body>
<h1>PatchCore score run: {len(record['products'])} products</h1>
<p>catalogue <code>{html.escape(record['model_uri'])}</code>, images <code>{html.escape(record['inputs'])}</code>,
run <code>{html.escape(record['run_id'])}</code></p>
<table><tr>{head}</tr>{body}</table>
{''.join(parts)}
<script>{SORT_SCRIPT}</script>
</body></html>"""
    uri = storage.join(output, "review.html")
    storage.write_bytes(uri, page.encode(), **opts)
    return uri
