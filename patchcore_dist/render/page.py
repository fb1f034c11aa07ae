"""Building blocks of the self-contained HTML pages (the evaluation report, a score run's review page):
the style, the table-sorting script, inline thumbnails, links relative to the page's folder, and a
crop of the original at native resolution around its heatmap's hottest point. Images are inlined as
base64; nothing on a page refers to a server or the network."""
from __future__ import annotations

import base64
import html
import os
import urllib.parse

import numpy as np
from PIL import Image

from ..artifacts import storage
from ..core.preprocessing import decode_sized
from ..errors import ImageError, StorageError
from .heatmap import encode, hottest_point

THUMB = 200          # thumbnail side, pixels
ZOOM_WINDOW = 256    # side of the zoomed crop, pixels of the original
ZOOM_MIN_SIDE = 2 * THUMB   # untiled images whose longer side is at most this get no zoomed crop

STYLE = """body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin-bottom:1em}
td,th{border:1px solid #ccc;padding:4px;vertical-align:top}img{max-width:200px}img.zoom{max-width:none}
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


def b64_png(img: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(encode(np.asarray(img))).decode()


def decoded(uri: str | None, opts: dict, image_config, shorter_side: int | None = None) -> np.ndarray | None:
    """An input, heatmap or mask decoded within the image limits (allowed formats only,
    ``image.max_bytes`` / ``image.max_pixels``), RGB; None when there is none or it cannot be read."""
    if not uri:
        return None
    try:
        data = storage.read_bytes(uri, **opts, limit=image_config.max_bytes + 1)
        if len(data) > image_config.max_bytes:
            return None
        return decode_sized(data, image_config.max_pixels, min_side=1, shorter_side=shorter_side)[0]
    except (FileNotFoundError, ImageError, StorageError):
        return None


def thumb(uri: str | None, opts: dict, image_config, size: int = THUMB) -> str:
    """A thumbnail (a data: URI) of an input, heatmap or mask; "" when there is none or it cannot be shown."""
    rgb = decoded(uri, opts, image_config, shorter_side=size)
    if rgb is None:
        return ""
    img = Image.fromarray(rgb)
    img.thumbnail((size, size))
    return b64_png(img)


def img_cell(src: str, cls: str = "") -> str:
    """A table cell with the inline image ``src``, or "none"."""
    if not src:
        return "<td><i>none</i></td>"
    return f'<td><img{f" class={cls!r}" if cls else ""} src="{src}"></td>'


def href(uri: str, base: str) -> str:
    """Where a link to ``uri`` points from a page in the folder ``base``: relative to it when both are
    local and ``uri`` lies below it, else the path or URI itself (URL-quoted)."""
    if storage.is_s3(uri) or storage.is_s3(base):
        return uri
    path = uri.removeprefix("file://")
    rel = os.path.relpath(path, base.removeprefix("file://")) if base else path
    target = rel if base and not rel.startswith("..") else os.path.abspath(path)
    return urllib.parse.quote(target.replace(os.sep, "/"), safe="/")


def link(uri: str | None, base: str, text: str = "heatmap") -> str:
    """A link to ``uri`` (:func:`href`) reading ``text``; "none" when there is no URI."""
    if not uri:
        return "<i>none</i>"
    return f'<a href="{html.escape(href(uri, base))}">{html.escape(text)}</a>'


def overlay_uri(heatmap: str | None) -> str | None:
    """The overlay JPEG written beside a heatmap PNG."""
    return heatmap[:-4] + "_overlay.jpg" if heatmap else None


def zoom(image_uri: str | None, heatmap_uri: str | None, opts: dict, image_config, force: bool = False,
         window: int = ZOOM_WINDOW) -> str:
    """A ``window`` x ``window`` crop of the original at native resolution centred on the hottest pixel
    of its heatmap PNG (the heatmap has the original's size, or a smaller one of the same aspect ratio:
    the point is scaled), with ticks at the borders marking that pixel; a data: URI. "" when the
    original is small enough for its thumbnail to show a defect (unless ``force``: tiled models) or a
    file cannot be read."""
    heat = decoded(heatmap_uri, opts, image_config)
    if heat is None or (not force and max(heat.shape[:2]) <= ZOOM_MIN_SIDE):
        return ""
    original = decoded(image_uri, opts, image_config)
    if original is None:
        return ""
    y, x = hottest_point(heat)
    h, w = original.shape[:2]
    cy, cx = min(h - 1, int((y + 0.5) * h / heat.shape[0])), min(w - 1, int((x + 0.5) * w / heat.shape[1]))
    top, left = min(max(0, cy - window // 2), max(0, h - window)), min(max(0, cx - window // 2), max(0, w - window))
    crop = original[top:top + window, left:left + window].copy()
    py, px, tick = cy - top, cx - left, max(4, window // 24)
    crop[:tick, max(0, px - 1):px + 1] = crop[-tick:, max(0, px - 1):px + 1] = (255, 0, 255)
    crop[max(0, py - 1):py + 1, :tick] = crop[max(0, py - 1):py + 1, -tick:] = (255, 0, 255)
    return b64_png(Image.fromarray(crop))


def zoom_note(window: int = ZOOM_WINDOW) -> str:
    return (f"zoom: {window} x {window} pixels of the original at native resolution around the heatmap's hottest "
            "point (marked by the magenta ticks at the borders)")
