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

import numpy as np
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


# Manifests: a table of image URIs given instead of a folder (a scheduler that knows what changed).
MANIFEST_EXTENSIONS = (".parquet", ".csv")
MANIFEST_TYPES = {"image": pa.string(), "size": pa.int64(), "mtime": pa.float64(), "etag": pa.string(),
                  "product": pa.string()}
MANIFEST_BATCH = 16384
MANIFEST_SCHEMA = storage.LISTING_SCHEMA.append(pa.field("verify", pa.bool_()))


def is_manifest(uri: str, opts: dict) -> bool:
    """``--images`` names a manifest: a file (not a folder) named ``*.parquet`` or ``*.csv``."""
    return uri.lower().endswith(MANIFEST_EXTENSIONS) and not storage.is_dir(uri, **opts)


def image_table(uri: str, opts: dict, what: str, exclude: str | None = None, max_bytes: int | None = None,
                root: str | None = None, product: str | None = None) -> tuple[pa.Table, int | None]:
    """The images a job reads: a folder's listing (:func:`listing_table`) or a manifest's entries
    (:func:`manifest_table`; with ``product``, its rows of that product), and how many URIs the
    manifest gave (None for a folder). ``root`` (``--images-root``): every image must lie under it."""
    if is_manifest(uri, opts):
        return manifest_table(uri, opts, what, exclude, max_bytes, root, product)
    if root is not None and storage.relative_to(uri, root) is None:
        raise JobError(f"{what} {uri} lies outside --images-root {root}")
    return listing_table(uri, opts, what, exclude, max_bytes), None


def manifest_products(uri: str, opts: dict) -> list[str | None]:
    """The distinct values of a manifest's ``product`` column, sorted ("" for rows without one); a
    JobError for a manifest without the column."""
    m = read_manifest(uri, opts)
    if "product" not in m.column_names:
        raise JobError(f"the manifest {uri} has no 'product' column: score --models routes each image by it")
    return sorted(set(pc.fill_null(m.column("product"), "").unique().to_pylist()))


def read_manifest(uri: str, opts: dict) -> pa.Table:
    """A manifest's columns (``image`` required; ``size``, ``mtime``, ``etag``, ``product`` optional;
    others ignored) in MANIFEST_TYPES; a clear JobError for an unreadable file or a wrong column. An
    ``mtime`` may be seconds or a timestamp (an S3 inventory's ``last_modified_date``)."""
    import io
    try:
        data = storage.read_bytes(uri, **opts)
    except FileNotFoundError:
        raise JobError(f"manifest not found: {uri}") from None
    except StorageError as e:
        raise JobError(f"cannot read the manifest {uri}: {e}") from None
    try:
        if uri.lower().endswith(".csv"):
            import pyarrow.csv as pcsv
            table = pcsv.read_csv(io.BytesIO(data), convert_options=pcsv.ConvertOptions(
                column_types={k: v for k, v in MANIFEST_TYPES.items() if k != "mtime"}, strings_can_be_null=True))
        else:
            import pyarrow.parquet as pq
            table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowException, OSError) as e:
        raise JobError(f"cannot read the manifest {uri}: {str(e).splitlines()[0]}") from None
    if "image" not in table.column_names:
        raise JobError(f"the manifest {uri} has no 'image' column (of image URIs); its columns: "
                       f"{', '.join(table.column_names) or 'none'}")
    cols = {}
    for name, typ in MANIFEST_TYPES.items():
        if name not in table.column_names:
            continue
        col = table.column(name)
        try:
            if name == "mtime" and pa.types.is_timestamp(col.type):
                col = pc.divide(pc.cast(pc.cast(col, pa.timestamp("us", tz="UTC")), pa.int64()), 1e6)
            cols[name] = pc.cast(col, typ)
        except (pa.ArrowException, ValueError) as e:
            raise JobError(f"the manifest {uri}: column {name!r} ({col.type}) is not {typ}: "
                           f"{str(e).splitlines()[0]}") from None
    return pa.table(cols)


def manifest_table(uri: str, opts: dict, what: str, exclude: str | None = None, max_bytes: int | None = None,
                   root: str | None = None, product: str | None = None) -> tuple[pa.Table, int]:
    """A manifest's images as a MANIFEST_SCHEMA table sorted by uri (the listing's columns and
    ``verify``: read the file and compare digests even where the statistics match, for S3 entries
    without an ETag), and how many URIs it gave. Validated as a listing is: each entry that cannot be
    read safely is an error row (:func:`_check_entry`); statistics the manifest gives are used as
    they are, a local file without them is stat'ed. Duplicates are collapsed with a warning.
    ``product``: only the rows whose ``product`` column holds it ("" the rows without one; score
    --models routes by it)."""
    m = read_manifest(uri, opts)
    if product is not None and "product" in m.column_names:
        m = m.filter(pc.fill_null(pc.equal(pc.fill_null(m.column("product"), ""), product), False))
    elif product is not None:
        m = m.slice(0, 0)
    if not m.num_rows:
        raise JobError(f"the manifest {uri} lists no images")
    img = m.column("image")
    missing = pc.fill_null(pc.or_(img.is_null(), pc.equal(img, "")), True).to_numpy(zero_copy_only=False)
    if missing.any():
        rows = ", ".join(str(i + 1) for i in np.flatnonzero(missing)[:5])
        raise JobError(f"the manifest {uri}: {int(missing.sum())} rows have no image URI (rows {rows}"
                       f"{', ...' if missing.sum() > 5 else ''}; the first data row is 1): give every row an image")
    if "product" in m.column_names and product is None:
        log.info("the manifest's product column is not used by a single-model run (score --models routes by it)")
    ctx, given = _ManifestContext(uri, exclude, root, max_bytes), m.num_rows
    batches = [_manifest_batch(m.slice(off, MANIFEST_BATCH), ctx) for off in range(0, given, MANIFEST_BATCH)]
    del m, img  # the manifest's own columns, before the sort copies the table
    table = pa.Table.from_batches(batches, MANIFEST_SCHEMA)
    del batches
    if not storage.is_sorted(table.column("uri")):
        table = table.take(pc.sort_indices(table, [("uri", "ascending")]))  # stable: a duplicate's first copy first
    first = np.r_[True, pc.not_equal(table.column("uri")[1:], table.column("uri")[:-1]).to_numpy(zero_copy_only=False)]
    if not first.all():
        log.warning("the manifest %s lists %d image URI(s) more than once: each is read and scored once", uri,
                    int((~first).sum()))
        table = table.filter(pa.array(first))
    log.info("%s: %d images from the manifest %s (%d refused by their entry)", what, table.num_rows, uri,
             table.num_rows - table.column("error").null_count)
    return table, given


class _ManifestContext:
    """What each manifest entry is checked against: the manifest's folder (relative entries), the
    job's output (never read) and --images-root (every entry under it), local paths also by their
    real path."""

    def __init__(self, uri: str, exclude: str | None, root: str | None, max_bytes: int | None):
        self.base = uri.rsplit("/", 1)[0] if storage.is_s3(uri) else os.path.dirname(storage.resolve(uri)[1])
        self.max_bytes = max_bytes
        self.excluded = _prefixes(exclude)
        self.roots = _prefixes(root)
        self.root = root
        self.bases = self.roots if root is not None else _prefixes(self.base)  # once: realpath is a syscall per part

    def under_root(self, u: str) -> str | None:
        """``u`` relative to --images-root (or the manifest's folder when there is no root); None outside."""
        for p in self.bases:
            if u.startswith(p):
                return u[len(p):]
        return None


def _prefixes(uri: str | None) -> tuple[str, ...]:
    """String prefixes of what lies under ``uri``: itself and (local) its real path, each ending in '/'."""
    if not uri:
        return ()
    if storage.is_s3(uri):
        return (uri.rstrip("/") + "/",)
    path = storage.resolve(uri)[1]
    return tuple(dict.fromkeys(p.rstrip("/") + "/" for p in (path, os.path.realpath(path))))


def _manifest_batch(chunk: pa.Table, ctx: _ManifestContext) -> pa.RecordBatch:
    """One slice of a manifest as a MANIFEST_SCHEMA record batch (column lists, one slice at a time)."""
    n = chunk.num_rows
    given = {c: chunk.column(c).to_pylist() if c in chunk.column_names else [None] * n
             for c in ("size", "mtime", "etag")}
    cols = {f.name: [] for f in MANIFEST_SCHEMA}
    for i, raw in enumerate(chunk.column("image").to_pylist()):
        u, rel, err = _check_entry(raw, ctx)
        size, mtime, ctime, etag = given["size"][i], given["mtime"][i], None, given["etag"][i]
        s3 = storage.is_s3(u)
        if err is None and not s3:  # always checked (a link out of the root, a FIFO, a missing file);
            err, st_size, st_mtime, ctime = _stat(u, ctx)  # the manifest's numbers, when given, are the stats
            size, mtime = (st_size if size is None else size), (st_mtime if mtime is None else mtime)
        if err is None and ctx.max_bytes is not None and (size or 0) > ctx.max_bytes:
            err = f"file is {size} bytes, over the limit image.max_bytes={ctx.max_bytes} (not read)"
        for k, v in (("uri", u), ("rel", rel), ("size", size), ("mtime", mtime), ("ctime", ctime), ("etag", etag),
                     ("error", err), ("verify", s3 and etag is None)):
            cols[k].append(v)
    return pa.RecordBatch.from_arrays([pa.array(cols[f.name], f.type) for f in MANIFEST_SCHEMA],
                                      schema=MANIFEST_SCHEMA)


def _check_entry(raw: str, ctx: _ManifestContext) -> tuple[str, str, str | None]:
    """A manifest entry's (URI as stored, relative path for its heatmap, error or None). Absolute local
    paths (or ``file://``) and ``s3://`` URIs are taken as they are, other entries resolved against
    the manifest's folder; never normalised (``a/../b`` would name another file than the row says)."""
    if raw.startswith("s3://"):
        u = raw
    elif raw.startswith("file://"):
        u = raw[len("file://"):]
    elif "://" in raw:
        return raw, raw.split("://", 1)[1], "unsupported URI scheme: give a local path or an s3:// URI"
    else:
        u = raw if raw.startswith("/") else ctx.base + "/" + raw
    s3 = storage.is_s3(u)
    rest = u[len("s3://"):] if s3 else u[1:]
    rel = ctx.under_root(u)
    rel = rel if rel else rest
    if s3:
        bucket, _, key = rest.partition("/")
        if not bucket or any(p in ("", ".", "..") for p in key.split("/")):
            return u, rel, storage.ODD_KEY if bucket else "s3:// URI without a bucket"
    elif any(p in ("", ".", "..") for p in rest.split("/")):
        return u, rel, "path has an empty, '.' or '..' segment: give the file's normalised absolute path"
    if not u.lower().endswith(IMAGE_EXTENSIONS):
        return u, rel, f"not an image file name ({', '.join(IMAGE_EXTENSIONS)})"
    if any(u.startswith(p) for p in ctx.excluded):
        return u, rel, "lies under the job's --output: a job never reads what it wrote"
    if ctx.root is not None and ctx.under_root(u) is None:
        return u, rel, f"outside --images-root {ctx.root}"
    return u, rel, None


def _stat(path: str, ctx: _ManifestContext) -> tuple[str | None, int | None, float | None, float | None]:
    """(error, size, mtime, ctime) of a local manifest entry from one ``lstat`` (a link: its target's,
    if the target exists and is a regular file); with --images-root declared, the entry's real path
    (every link on its way resolved) must lie under it."""
    import stat as st_mod
    try:
        st = os.lstat(path)
        # any link on the way (the file, or a folder above it) must stay under --images-root
        if ctx.root is not None and not any((os.path.realpath(path) + "/").startswith(p) for p in ctx.roots):
            return "a symbolic link on its path leads outside --images-root: not followed", None, None, None
        if st_mod.S_ISLNK(st.st_mode):
            st = os.stat(path)
    except FileNotFoundError:
        return "not found", None, None, None
    except OSError as e:
        return f"cannot read the file's status: {e.strerror or e}", None, None, None
    if not st_mod.S_ISREG(st.st_mode):
        return "not a regular file", None, None, None
    return None, st.st_size, storage.file_mtime(st), st.st_ctime
