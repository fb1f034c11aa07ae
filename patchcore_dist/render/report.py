"""A self-contained static HTML report (images inlined as base64): opens from a laptop or object storage."""
from __future__ import annotations

import base64
import html
import io

import numpy as np
from PIL import Image

from ..artifacts import storage
from ..artifacts.inputs import category_entry, mask_uri
from ..core.preprocessing import decode_sized
from ..errors import ImageError, StorageError
from .heatmap import encode


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


def _histogram(rows: list[dict], threshold) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _fmt(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.3f}"


def render_report(metrics: dict, rows: list[dict], dataset: str, config, opts: dict, n: int = 8) -> str:
    def triple(r):
        rel, defect, name = category_entry(dataset, r["image"])
        overlay = r["heatmap"][:-4] + "_overlay.jpg" if r.get("heatmap") else None
        mask = "" if defect == "good" else _thumb(mask_uri(dataset, defect, name), opts, config.image)
        cells = [_thumb(r["image"], opts, config.image),
                 _thumb(overlay, opts, config.image) or _thumb(r.get("heatmap"), opts, config.image), mask]
        imgs = "".join(f"<td>{'<img src=' + repr(c) + '>' if c else '<i>none</i>'}</td>" for c in cells)
        return (f"<tr><td>{html.escape(rel)}<br>score {r['score']:.3f}<br>"
                f"{'anomalous' if r['label'] else 'normal'}</td>{imgs}</tr>")

    top = sorted(rows, key=lambda r: -r["score"])[:n]
    missed = sorted([r for r in rows if r["label"] == 1], key=lambda r: r["score"])[:n]
    false_alarms = sorted([r for r in rows if r["label"] == 0], key=lambda r: -r["score"])[: max(2, n // 2)]
    head = "<tr><th>image</th><th>input</th><th>heatmap overlay</th><th>ground truth</th></tr>"
    defects = "".join(f"<tr><td>{html.escape(k)}</td><td>{v['images']}</td><td>{_fmt(v['image_auroc'])}</td>"
                      f"<td>{_fmt(v['pixel_auroc'])}</td><td>{_fmt(v['pro'])}</td></tr>"
                      for k, v in metrics["per_defect"].items())
    errs = "".join(f"<li>{html.escape(e['image'])}: {html.escape(e['error'])}</li>" for e in metrics["errors"])
    warns = "".join(f"<li>{html.escape(w)}</li>" for w in metrics["warnings"])
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>patchcore-dist report</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;
padding:4px;vertical-align:top}}img{{max-width:200px}}</style></head><body>
<h1>PatchCore evaluation</h1>
<p>dataset <code>{html.escape(dataset)}</code>, model <code>{html.escape(metrics['model'])}</code>,
backbone <code>{html.escape(config.backbone.name)}</code>, {metrics['scored']} of {metrics['images']} test images scored</p>
<table><tr><th>image AUROC</th><th>pixel AUROC</th><th>PRO (FPR &le; 0.3)</th><th>F1-optimal threshold</th><th>F1</th></tr>
<tr><td>{_fmt(metrics['image_auroc'])}</td><td>{_fmt(metrics['pixel_auroc'])}</td><td>{_fmt(metrics['pro'])}</td>
<td>{_fmt(metrics['threshold'])}</td><td>{_fmt(metrics['f1'])}</td></tr></table>
<h2>Per defect type (each against all normal test images)</h2>
<table><tr><th>defect</th><th>images</th><th>image AUROC</th><th>pixel AUROC</th><th>PRO</th></tr>{defects}</table>
<h2>Image scores</h2><img style="max-width:600px" src="{_histogram(rows, metrics['threshold'])}">
<h2>Highest-scored images</h2><table>{head}{''.join(triple(r) for r in top)}</table>
<h2>Worst-missed anomalous images (lowest scores)</h2><table>{head}{''.join(triple(r) for r in missed)}</table>
<h2>Highest-scored normal images (false alarms)</h2><table>{head}{''.join(triple(r) for r in false_alarms)}</table>
{'<h2>Errors</h2><ul>' + errs + '</ul>' if errs else ''}{'<h2>Warnings</h2><ul>' + warns + '</ul>' if warns else ''}
</body></html>"""
