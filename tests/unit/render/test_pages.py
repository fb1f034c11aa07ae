"""The pages, rendered from rows: the evaluation report's verdicts (one threshold, named on the page;
"above" is strictly greater, as the score table's is_anomaly; missed anomalies at or below it, false
alarms above it); the review page without a threshold and with a normalized_score column; and, on
both, a crop of a large original at native resolution around its heatmap's hottest point."""
import os
import re

import numpy as np
import pyarrow as pa
from PIL import Image
from scipy import ndimage

from patchcore_dist.config import load_config
from patchcore_dist.render import heatmap as hm
from patchcore_dist.render.report import render_report
from patchcore_dist.render.review import render_review
from patchcore_dist.synthetic.defects import stain
from patchcore_dist.synthetic.photos import mosaic_variants


def _metrics(threshold, rows):
    return {"model": "0123456789abcdef", "images": len(rows), "scored": len(rows), "image_auroc": 0.9,
            "pixel_auroc": 0.9, "pro": 0.8, "threshold": threshold, "f1": 0.8, "per_defect": {}, "warnings": [],
            "errors": [], "heatmap": {}}


def _section(page: str, title: str) -> str:
    """The page from the heading starting with ``title`` to the next heading."""
    start = page.index("<h2>" + title)
    end = page.find("<h2>", start + 4)
    return page[start:end if end > 0 else len(page)]


def _images(category):
    test = os.path.join(category, "test")
    good = sorted(os.listdir(os.path.join(test, "good")))
    bad = sorted(d for d in os.listdir(test) if d != "good")
    anomalous = [os.path.join(test, d, sorted(os.listdir(os.path.join(test, d)))[0]) for d in bad]
    return [os.path.join(test, "good", g) for g in good], anomalous


def test_misses_are_at_or_below_the_threshold_and_false_alarms_above_it(category):
    good, bad = _images(category)
    t = 2.0
    rows = [{"image": bad[0], "label": 1, "score": 1.5, "heatmap": None},    # missed
            {"image": bad[1], "label": 1, "score": t, "heatmap": None},      # exactly at: missed too
            {"image": bad[2], "label": 1, "score": 3.0, "heatmap": None},    # detected
            {"image": good[0], "label": 0, "score": t, "heatmap": None},     # exactly at: not a false alarm
            {"image": good[1], "label": 0, "score": 2.5, "heatmap": None},   # false alarm
            {"image": good[2], "label": 0, "score": 1.0, "heatmap": None}]
    config = load_config(None, [])
    page = render_report(_metrics(t, rows), rows, category, config, {})
    rel = lambda p: os.path.relpath(p, os.path.join(category, "test"))  # noqa: E731
    missed = _section(page, "Worst-missed")
    assert rel(bad[0]) in missed and rel(bad[1]) in missed and rel(bad[2]) not in missed
    assert missed.index(rel(bad[0])) < missed.index(rel(bad[1]))  # lowest first
    alarms = _section(page, "False alarms")
    assert rel(good[1]) in alarms and rel(good[0]) not in alarms and rel(good[2]) not in alarms
    assert "F1-optimal threshold of this test set 2.000" in page  # the one threshold, named
    verdicts = dict(re.findall(r'<tr class="\w+"><td>([^<]+)</td>.*?<td>(above|below)</td>', page))
    assert verdicts[rel(good[0])] == verdicts[rel(bad[1])] == "below"  # the table agrees with the sections
    assert verdicts[rel(good[1])] == verdicts[rel(bad[2])] == "above"

    clean = [r for r in rows if r["score"] != t and (r["label"] == 1) == (r["score"] > t)]  # all judged right
    page = render_report(_metrics(t, clean), clean, category, config, {})
    assert "None: every anomalous image scores above the threshold 2.000" in _section(page, "Worst-missed")
    assert "None: no normal image scores above the threshold 2.000" in _section(page, "False alarms")


def large_image_with_heatmap(tmp_path, half: bool = True):
    """A 1024 x 1024 native-scale mosaic of a real photograph with a small stain, and its heatmap PNG
    (hot at the stain; at half resolution when ``half``, as a capped heatmap is): (image path,
    heatmap path, the stain's mask)."""
    image = mosaic_variants("brick", 1, 1024, seed=3)[0]
    defective, mask = stain(image, np.random.default_rng(5), size=24)
    amap = ndimage.gaussian_filter(mask.astype(np.float32), 6)
    if half:
        amap = amap[::2, ::2]
    amap = amap / amap.max()
    img_path, heat_path = tmp_path / "data" / "test" / "stain" / "000.png", tmp_path / "out" / "heatmaps" / "000.png"
    for p in (img_path, heat_path):
        p.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(defective).save(img_path)
    Image.fromarray(hm.colorize(amap, (0.0, 1.0))).save(heat_path)
    return str(img_path), str(heat_path), mask, defective


def zoomed_crops(page: str) -> list[np.ndarray]:
    import base64
    import io
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(b)))) for b in
            re.findall(r'<img class=.zoom. src="data:image/png;base64,([^"]+)"', page)]


def assert_zoom_shows_the_defect(crop: np.ndarray, mask: np.ndarray, original: np.ndarray):
    """The crop is a 256 x 256 window of the original at native resolution holding the whole defect."""
    assert crop.shape == (256, 256, 3)
    ys, xs = np.nonzero(mask)
    inner = crop[16:-16, 16:-16]  # away from the ticks at the borders
    t0, l0 = max(0, ys.max() - 255), max(0, xs.max() - 255)  # windows holding the whole defect
    first = original[t0 + 16:ys.min() + 17, l0 + 16:xs.min() + 17]
    candidates = np.argwhere((first == inner[0, 0]).all(-1)) + (t0, l0)
    hits = [(top, left) for top, left in candidates
            if np.array_equal(original[top + 16:top + 240, left + 16:left + 240], inner)]
    assert hits, "the crop is not a window of the original around the defect"


def test_the_report_galleries_zoom_into_large_originals(tmp_path):
    image, heat, mask, original = large_image_with_heatmap(tmp_path)
    rows = [{"image": image, "label": 1, "score": 3.0, "heatmap": heat}]
    page = render_report(_metrics(None, rows), rows, str(tmp_path / "data"), load_config(None, []), {})
    crops = zoomed_crops(page)
    assert len(crops) == 1  # in the highest-scored gallery (no threshold: no verdict galleries)
    assert_zoom_shows_the_defect(crops[0], mask, original)


def _record(threshold, inputs=""):
    return {"run_id": "20260101T000000000000Z-abcdef12", "model": "0123456789abcdef", "model_uri": "/models/m",
            "inputs": inputs, "images_listed": 3, "scored": 3, "skipped": 0, "errors": 0, "errors_by_reason": {},
            "threshold": threshold, "anomalies": None if threshold is None else 1,
            "anomaly_rate": None if threshold is None else 1 / 3}


def _rows(table: pa.Table, flagged: pa.Table) -> dict:
    errors = pa.table({"image": pa.array([], pa.string()), "error": pa.array([], pa.string())})
    return {"flagged": flagged, "n_flagged": flagged.num_rows, "top": flagged if flagged.num_rows else table,
            "errors": errors, "n_errors": 0}


def test_review_page_without_a_threshold_and_with_a_normalized_score_column(tmp_path):
    image, heat, mask, original = large_image_with_heatmap(tmp_path)
    table = pa.table({"image": [image, image + "-b"], "score": [3.0, 2.0], "is_anomaly": pa.nulls(2, pa.bool_()),
                      "heatmap": [heat, None], "error": pa.nulls(2, pa.string())})
    config = load_config(None, [])
    base = str(tmp_path / "out")
    page = render_review(_record(None), "none", _rows(table, table.slice(0, 0)), config, {}, base)
    assert "No threshold: nothing flagged; showing the highest scores." in page
    assert page.index(image + "<br>") < page.index(image + "-b<br>")  # the top scores, highest first
    assert "normalized" not in page and "Every flagged image" not in page
    crops = zoomed_crops(page)
    assert len(crops) == 1  # the second row has no heatmap: no zoom
    assert_zoom_shows_the_defect(crops[0], mask, original)

    flagged = table.slice(0, 1).set_column(2, "is_anomaly", pa.array([True])).append_column(
        "normalized_score", pa.array([0.75]))
    page = render_review(_record(2.5), "calibrated", _rows(table, flagged), config, {}, base)
    assert "<th>normalized score</th>" in page and "normalized 0.750" in page
    assert re.search(r'<td class="num" data-v="0.750000">0.750</td>', page)
    assert "Decision threshold: <b>2.500</b> (calibrated)" in page
