"""Inputs on storage: listing image folders, the MVTec AD layout, the fit's hold-out split.

MVTec AD layout of a category root:

    <root>/train/good/*.png                    normal images to fit on
    <root>/test/<defect or good>/*.png         test images, labelled by their folder
    <root>/ground_truth/<defect>/<name>_mask.png
"""
from __future__ import annotations

import hashlib
import logging
import os

import pyarrow as pa
import pyarrow.compute as pc

from ..core.preprocessing import IMAGE_EXTENSIONS
from ..errors import JobError, StorageError
from . import storage

log = logging.getLogger(__name__)


def list_images(uri: str, opts: dict, what: str, exclude: str | None = None,
                max_bytes: int | None = None) -> list[dict]:
    """:func:`listing_table` as dicts (entries: uri, rel, size, mtime, ctime, etag, error)."""
    return listing_table(uri, opts, what, exclude, max_bytes).to_pylist()


def listing_table(uri: str, opts: dict, what: str, exclude: str | None = None,
                  max_bytes: int | None = None) -> pa.Table:
    """Image files under ``uri`` as a LISTING_SCHEMA table sorted by uri (built in record batches, no
    Python object per file); a clear JobError when there are none.

    ``exclude``: a location that may lie inside ``uri`` (the job's own output) whose files are left out,
    so a job never reads back what it wrote; the same location as ``uri`` is refused. ``max_bytes``:
    a larger file gets an error from the listing's size, without being read. An entry with ``error``
    set must not be read: the job writes its error row.
    """
    try:
        files = storage.list_table(uri, IMAGE_EXTENSIONS, **opts)
    except FileNotFoundError:
        raise JobError(f"{what} not found: {uri}") from None
    except StorageError as e:
        raise JobError(f"cannot list {what} {uri}: {e}") from None
    inside = storage.relative_to(exclude, uri) if exclude else None
    if inside == "":
        raise JobError(f"the output {exclude} is the {what} location itself: write the output elsewhere")
    if inside:
        rel = files.column("rel")
        out = pc.or_(pc.equal(rel, inside), pc.starts_with(rel, inside + "/"))
        kept = files.filter(pc.invert(out))
        log.warning("the output %s lies inside %s %s: its %d files are left out of the listing", exclude, what,
                    uri, files.num_rows - kept.num_rows)
        files = kept
    if not files.num_rows:
        raise JobError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {what} {uri}")
    return _over_max_bytes(files, max_bytes)


def _over_max_bytes(files: pa.Table, max_bytes: int | None) -> pa.Table:
    """``files`` with an error on each file larger than ``max_bytes`` (by its listed size; not read)."""
    if max_bytes is None:
        return files
    size = files.column("size")
    over = pc.and_(pc.fill_null(pc.greater(size, max_bytes), False), files.column("error").is_null())
    if not pc.any(over).as_py():
        return files
    msg = pc.binary_join_element_wise("file is ", pc.cast(size, pa.string()),
                                      f" bytes, over the limit image.max_bytes={max_bytes} (not read)", "")
    i = files.schema.get_field_index("error")
    return files.set_column(i, "error", pc.if_else(over, msg, files.column("error")))


def resolve_train_root(uri: str, opts: dict) -> str:
    """An MVTec AD category root (with train/good) stands for its train/good folder."""
    candidate = storage.join(uri, "train", "good")
    if storage.is_dir(candidate, **opts):
        log.info("%s is an MVTec AD category: fitting on train/good", uri)
        return candidate
    return uri


def category_test(dataset: str) -> str:
    """The test/ folder of an MVTec AD category."""
    return storage.join(dataset, "test")


def category_entry(dataset: str, image_uri: str) -> tuple[str, str, str]:
    """A test image's (path relative to test/, defect type or "good", file name)."""
    rel = image_uri[len(category_test(dataset).rstrip("/")) + 1:]
    defect, name = rel.split("/", 1) if "/" in rel else ("good", rel)
    return rel, defect, name


def mask_uri(dataset: str, defect: str, name: str) -> str:
    """The ground-truth mask of test image ``name`` of ``defect``."""
    return storage.join(dataset, "ground_truth", defect, f"{os.path.splitext(name)[0]}_mask.png")


def holdout(entries: list[tuple[str, str]], fraction: float, seed: int) -> set[str]:
    """A deterministic held-out subset of (uri, rel) entries, by a seeded hash of the URI (so it is
    stable as data grows)."""
    if fraction <= 0:
        return set()
    keyed = sorted(entries, key=lambda e: hashlib.sha256(f"{seed}:{e[0]}".encode()).hexdigest())
    n = max(1, int(round(len(entries) * fraction)))
    if n >= len(entries):
        raise JobError(f"fit.holdout_fraction={fraction} leaves no training images of {len(entries)}")
    return {u for u, _ in keyed[:n]}
