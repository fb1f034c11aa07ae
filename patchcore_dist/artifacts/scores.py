"""The score table on storage: one row per input image and model, as Parquet parts.

    <output>/scores/<model digest>/part-<run time>-<run id>-<seq>.parquet

Parts are written atomically and named by run time; :func:`compact` keeps the newest row per image.
"""
from __future__ import annotations

import pyarrow as pa

from . import storage

SCORE_SCHEMA = pa.schema([
    ("image", pa.string()),          # input URI
    ("score", pa.float64()),         # image score s* (null when error is set)
    ("is_anomaly", pa.bool_()),      # score > the model's calibrated threshold (null without one)
    ("heatmap", pa.string()),        # heatmap PNG URI (null when none was written)
    ("height", pa.int32()),          # original image size (0 when it could not be decoded)
    ("width", pa.int32()),
    ("model", pa.string()),          # the model's digest
    ("error", pa.string()),          # null, or why the image could not be scored
    ("warning", pa.string()),        # null, or what went wrong without costing the score (no heatmap written)
    ("digest", pa.string()),         # sha256 of the image file
    ("size", pa.int64()),            # file size and modification time (seconds) when scored
    ("mtime", pa.float64()),
    ("decode_ms", pa.float32()),
    ("score_ms", pa.float32()),
    ("scored_at", pa.timestamp("s", tz="UTC")),
])
GRID_FIELDS = [("grid_h", pa.int32()), ("grid_w", pa.int32()), ("patch_scores", pa.list_(pa.float32()))]


def table_schema(patch_scores: bool) -> pa.Schema:
    """The score table's schema, with the patch-score grid columns when they are kept."""
    return pa.schema(list(SCORE_SCHEMA) + [pa.field(n, t) for n, t in GRID_FIELDS]) if patch_scores else SCORE_SCHEMA


def scores_uri(output: str, model: str) -> str:
    """Where one model's score partition lies under ``output``."""
    return storage.join(output, "scores", model)


def write_part(output: str, model: str, run: str, seq: int, rows: list[dict], schema: pa.Schema,
               opts: dict) -> str:
    """Write one part of a run's rows atomically; returns its URI."""
    uri = storage.join(scores_uri(output, model), f"part-{run}-{seq:05d}.parquet")
    storage.write_bytes(uri, storage.parquet_bytes(pa.Table.from_pylist(rows, schema=schema)), **opts)
    return uri


def read_parts(output: str, model: str, opts: dict) -> list[tuple[str, pa.Table]]:
    """Every part of one model's score partition, in name (= run) order, as (uri, table)."""
    try:
        files = storage.list_files(scores_uri(output, model), (".parquet",), **opts)
    except FileNotFoundError:
        return []
    return [(u, storage.read_parquet(u, **opts)) for u, _ in files]


def compact(parts: list[tuple[str, pa.Table]], opts: dict, superseded: frozenset | set = frozenset()
            ) -> tuple[list[tuple[str, pa.Table]], int]:
    """Keep one row per image in a model's score partition: the newest (parts are named by run time),
    and none for the images in ``superseded`` (just scored again, in a newer part).

    Affected parts are rewritten atomically or deleted when emptied. Runs at the start of every score
    (cleaning up after an interrupted run) on the parts it has read, and at the end on the same parts
    with this run's images. Returns the surviving (uri, table) parts and the number of rows dropped.
    """
    newest = {}
    for pi, (_, t) in enumerate(parts):  # sorted by name = by run
        for ri, img in enumerate(t.column("image").to_pylist()):
            newest[img] = (pi, ri)
    kept, dropped = [], 0
    for pi, (uri, t) in enumerate(parts):
        keep = [ri for ri, img in enumerate(t.column("image").to_pylist())
                if newest[img] == (pi, ri) and img not in superseded]
        if len(keep) == t.num_rows:
            kept.append((uri, t))
            continue
        dropped += t.num_rows - len(keep)
        if keep:
            t = t.take(pa.array(keep, pa.int64()))
            storage.write_bytes(uri, storage.parquet_bytes(t), **opts)
            kept.append((uri, t))
        else:
            storage.delete(uri, **opts)
    return kept, dropped


def read_scores(output: str, opts: dict | None = None, model: str | None = None) -> pa.Table:
    """The score table under <output>/scores/ (all models, or one model's digest)."""
    opts = opts or {}
    root = scores_uri(output, model) if model else storage.join(output, "scores")
    try:
        files = storage.list_files(root, (".parquet",), **opts)
    except FileNotFoundError:
        files = []
    tables = [storage.read_parquet(u, **opts) for u, _ in files]
    return pa.concat_tables(tables, promote_options="default") if tables else SCORE_SCHEMA.empty_table()
