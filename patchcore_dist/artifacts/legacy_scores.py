"""Score output of earlier versions: Parquet parts, one folder per model, which the score table
(a Delta table in the same folder) converts once.

    <output>/scores/<model digest>/part-<run time>-<run id>-<seq>.parquet

Parts are named by run time; the newest row per image is the live one.
"""
from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from . import storage

log = logging.getLogger(__name__)


def find_parts(scores_uri: str, opts: dict) -> dict[str, list[str]]:
    """model digest -> its part URIs (sorted, i.e. by run) under ``scores_uri``; empty when there
    are none. Looks only at the folder's own sub-folders (no recursive listing): Delta's own
    (``_delta_log``, ``model=<digest>``) are not parts."""
    fs, root = storage.resolve(scores_uri, **opts)
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=False, allow_not_found=True))
    except Exception as e:
        raise storage._wrap(scores_uri, e) from None
    parts = {}
    for fi in infos:
        if fi.type != pafs.FileType.Directory or fi.base_name.startswith(("_", ".")) or "=" in fi.base_name:
            continue
        files = [u for u, rel in storage.list_files(storage.join(scores_uri, fi.base_name), (".parquet",), **opts)
                 if "/" not in rel and rel.startswith("part-")]
        if files:
            parts[fi.base_name] = files
    return parts


def newest_rows(parts: dict[str, list[str]], opts: dict) -> tuple[pa.Table, pa.Table | None]:
    """The newest row per image and model of the parts, and their patch-score grids (image, model,
    scored_at, grid_h, grid_w, patch_scores) when the parts kept them (else None)."""
    tables = []
    for model, uris in sorted(parts.items()):
        for uri in uris:
            t = storage.read_parquet(uri, **opts)
            tables.append(t.set_column(t.schema.get_field_index("model"), "model", pa.array([model] * t.num_rows))
                          if "model" in t.column_names else t)
    table = pa.concat_tables(tables, promote_options="default")
    last = (table.select(["image", "model"]).append_column("__i", pa.array(np.arange(table.num_rows)))
            .group_by(["image", "model"], use_threads=False).aggregate([("__i", "max")]))
    table = table.take(np.sort(last.column("__i_max").to_numpy()))
    grid_cols = ["grid_h", "grid_w", "patch_scores"]
    grids = None
    if all(c in table.column_names for c in grid_cols):
        grids = table.select(["image", "model", "scored_at"] + grid_cols).filter(table.column("grid_h").is_valid())
    return table.drop_columns([c for c in grid_cols if c in table.column_names]), grids


def delete_parts(parts: dict[str, list[str]], opts: dict) -> None:
    """Delete converted parts (and, on local disks, their emptied folders)."""
    import os
    for uris in parts.values():
        for uri in uris:
            storage.delete(uri, **opts)
        if uris and not storage.is_s3(uris[0]):
            folder = os.path.dirname(storage.resolve(uris[0])[1])
            try:
                os.rmdir(folder)
            except OSError:  # not empty: something else is in it, leave it
                log.info("kept %s: it holds other files", folder)
