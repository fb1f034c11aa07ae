"""URIs and filesystems: local paths, ``file://`` and ``s3://bucket/prefix``, all through pyarrow.fs.

Writes are atomic for readers: local files are written under a temporary name and renamed; an S3
object becomes visible only when its upload completes. Credentials come from the standard AWS
environment / config files and are never logged.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import operator
import os
import posixpath
import re
import stat
import uuid
from functools import lru_cache
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from ..errors import StorageError

log = logging.getLogger(__name__)

def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


@lru_cache(maxsize=16)
def _s3(endpoint_url: str | None, region: str | None) -> pafs.S3FileSystem:
    endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs = {"region": region or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"}
    if endpoint_url:
        u = urlparse(endpoint_url)
        kwargs["endpoint_override"] = u.netloc or u.path
        kwargs["scheme"] = u.scheme or "https"
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str, endpoint_url: str | None = None, region: str | None = None) -> tuple[pafs.FileSystem, str]:
    """URI -> (pyarrow filesystem, path within it)."""
    if not uri:
        raise StorageError("empty URI")
    if is_s3(uri):
        # Not urlparse: '#' and '?' are legal in object keys.
        bucket, _, key = uri[len("s3://"):].partition("/")
        if not bucket:
            raise StorageError(f"{uri}: no bucket")
        return _s3(endpoint_url, region), (bucket + "/" + key).rstrip("/")
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    elif "://" in uri:
        raise StorageError(f"unsupported URI scheme in {uri!r}: use a local path, file:// or s3://")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def is_relative(uri: str) -> bool:
    """A local path relative to the working directory (no scheme, not absolute, no ``~``)."""
    return "://" not in uri and not os.path.isabs(uri) and not uri.startswith("~")


def absolute(uri: str) -> str:
    """``uri`` with a local path made absolute against the working directory (``~`` expanded); an
    ``s3://`` or ``file://`` URI as it is. What a job stores and compares is this form."""
    if "://" in uri or not uri:
        return uri
    return os.path.abspath(os.path.expanduser(uri))


def join(base: str, *parts: str) -> str:
    if is_s3(base):
        return "/".join([base.rstrip("/")] + [p.strip("/") for p in parts])
    if base.startswith("file://"):
        return "file://" + os.path.join(base[len("file://"):], *parts)
    return os.path.join(base, *parts)


def _wrap(uri: str, e: Exception) -> Exception:
    msg = str(e)
    if isinstance(e, FileNotFoundError) or "NoSuchBucket" in msg or "NoSuchKey" in msg or "Path does not exist" in msg:
        return FileNotFoundError(f"not found: {uri}")
    if isinstance(e, PermissionError) or "AccessDenied" in msg or "Forbidden" in msg or "403" in msg:
        return StorageError(f"no permission for {uri}: {msg.splitlines()[0]}")
    return StorageError(f"{uri}: {msg.splitlines()[0] if msg else type(e).__name__}")


def read_bytes(uri: str, endpoint_url: str | None = None, region: str | None = None,
               limit: int | None = None, within: str | None = None) -> bytes:
    """The object's bytes; with ``limit``, at most that many (the caller checks whether there were more).
    ``within`` (local files): the folder the file was listed under; the file opened must be a regular
    file whose real path lies inside it (:func:`_read_within`)."""
    if within is not None and not is_s3(uri):
        return _read_within(uri, within, limit)
    fs, path = resolve(uri, endpoint_url, region)
    try:
        with fs.open_input_stream(path) as f:
            return f.read() if limit is None else f.read(limit)
    except Exception as e:  # pyarrow raises OSError subclasses with the backend's message
        raise _wrap(uri, e) from None


def listed_root(uri: str, rel: str | None) -> str | None:
    """The folder a listed file was found under (its URI without the listed relative path), or None
    where the URI does not end with it (a manifest entry's heatmap name)."""
    if not rel or not uri.endswith("/" + rel):
        return None
    return uri[:-len(rel)]


def _read_within(uri: str, root: str, limit: int | None) -> bytes:
    """A listed local file, read only when what opens is a regular file whose real path (of the open
    descriptor: no window between the check and the read) lies under ``root``'s real path. The listing
    never follows a folder link out of the root, but a folder replaced by such a link after the
    listing would otherwise be followed now."""
    path = resolve(uri)[1]
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO put there is not waited on
    except OSError as e:
        raise _wrap(uri, e) from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise StorageError(f"{uri}: not a regular file (it changed since it was listed)")
        proc = f"/proc/self/fd/{fd}"
        real = os.readlink(proc) if os.path.exists(proc) else os.path.realpath(path)
        real_root = os.path.realpath(resolve(root)[1])
        if not real.startswith(real_root.rstrip(os.sep) + os.sep):
            raise StorageError(f"{uri}: not read: the file now lies outside {root} ({real}); a folder was "
                               "replaced by a link after the listing")
        return f.read() if limit is None else f.read(limit)


def write_bytes(uri: str, data: bytes, endpoint_url: str | None = None, region: str | None = None,
                durable: bool = True) -> None:
    """Write atomically: readers see the old object / no object, or the whole new one. A local file is
    also flushed to disk before it replaces the old one (``durable``); derived outputs that a rerun
    redraws (heatmaps) skip that: the fsync cost ~8 % of a score job's time on a local disk."""
    fs, path = resolve(uri, endpoint_url, region)
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            # Hidden temporary name: Parquet dataset readers and our listings skip dot-files.
            tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
            with open(tmp, "wb") as f:
                f.write(data)
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        else:
            with fs.open_output_stream(path) as f:
                f.write(data)
    except Exception as e:
        raise _wrap(uri, e) from None


def create_exclusive(uri: str, data: bytes, endpoint_url: str | None = None, region: str | None = None) -> None:
    """Create an object only if it does not exist (FileExistsError otherwise), atomically against a
    concurrent creator: local files with ``O_CREAT | O_EXCL`` (atomic on local POSIX file systems, not
    on every network file system); S3 with a conditional PUT (``If-None-Match: *``, through boto3:
    pyarrow has no conditional write), which AWS S3, MinIO and other stores implementing conditional
    writes honour; a store that ignores the header gives no guarantee, one that refuses it is a
    StorageError."""
    fs, path = resolve(uri, endpoint_url, region)
    if isinstance(fs, pafs.LocalFileSystem):
        _create_local(path, data)
        return
    from botocore.exceptions import ClientError
    bucket, _, key = uri[len("s3://"):].partition("/")
    try:
        _boto3(endpoint_url, region).put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
    except ClientError as e:
        if _s3_condition_failed(e):
            raise FileExistsError(f"exists: {uri}") from None
        code = e.response.get("Error", {}).get("Code", "")
        raise StorageError(f"{uri}: conditional create failed ({code or e}); the store may not support "
                           "conditional writes (If-None-Match)") from None


def _create_local(path: str, data: bytes) -> None:
    """Create-if-absent with the whole content at once: written under a temporary name, then hard-linked
    to ``path`` (``link`` fails when ``path`` exists), so no reader sees a partly written file and a
    creator killed half-way leaves nothing at ``path``. Where the file system has no hard links:
    ``O_CREAT | O_EXCL`` and a write."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)  # FileExistsError if present
        return
    except FileExistsError:
        raise
    except OSError:  # no hard links here (EPERM, ENOTSUP, EMLINK)
        pass
    finally:
        os.remove(tmp)
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)  # FileExistsError if present
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _s3_condition_failed(e) -> bool:
    """A boto3 ClientError saying a conditional request's precondition did not hold (412, or 409 for a
    concurrent conditional write)."""
    code = e.response.get("Error", {}).get("Code", "")
    return code in ("PreconditionFailed", "ConditionalRequestConflict") or e.response.get(
        "ResponseMetadata", {}).get("HTTPStatusCode") in (409, 412)


# Compare-and-swap on one small object (the fit lease). The tag of a content is what the swap compares:
# on S3 the object's ETag, locally the content's sha256.
CLAIM = re.compile(r"^\..+\.cas-[0-9a-f]{16}$")  # a local swap's claim (hidden; see _local_swap)


def read_tagged(uri: str, endpoint_url: str | None = None, region: str | None = None) -> tuple[bytes, str]:
    """(content, tag) of an object read once; FileNotFoundError when it does not exist."""
    fs, path = resolve(uri, endpoint_url, region)
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            with open(path, "rb") as f:
                data = f.read()
            return data, hashlib.sha256(data).hexdigest()
        bucket, _, key = uri[len("s3://"):].partition("/")
        r = _boto3(endpoint_url, region).get_object(Bucket=bucket, Key=key)
        return r["Body"].read(), r["ETag"]
    except Exception as e:
        raise _wrap(uri, e) from None


def replace_if_tag(uri: str, tag: str, data: bytes, endpoint_url: str | None = None,
                   region: str | None = None) -> bool:
    """Replace the object by ``data`` only if it still holds the content whose tag :func:`read_tagged`
    returned; True when replaced, False when it holds something else or is gone. S3: a PUT with
    ``If-Match: <ETag>`` (honoured by AWS S3 since 2024-11 and by moto; a store that ignores it gives no
    guarantee, one that refuses it is a StorageError).
    Local: see :func:`_local_swap`."""
    return _swap(uri, tag, data, endpoint_url, region)


def delete_if_tag(uri: str, tag: str, endpoint_url: str | None = None, region: str | None = None) -> bool:
    """Delete the object only if it still holds the content of ``tag``; True when deleted. S3: a DELETE
    with ``If-Match: <ETag>`` (AWS S3 since 2025-09 and Ceph honour it; a store that rejects the header
    as not implemented gets a plain DELETE right after the compare, logged; one that ignores it
    silently gets that too). Local: see :func:`_local_swap`."""
    return _swap(uri, tag, None, endpoint_url, region)


def _swap(uri: str, tag: str, data: bytes | None, endpoint_url: str | None, region: str | None) -> bool:
    fs, path = resolve(uri, endpoint_url, region)
    if isinstance(fs, pafs.LocalFileSystem):
        try:
            return _local_swap(path, tag, data)
        except OSError as e:
            raise _wrap(uri, e) from None
    from botocore.exceptions import ClientError
    client, (bucket, _, key) = _boto3(endpoint_url, region), uri[len("s3://"):].partition("/")
    try:
        if data is None:
            try:
                client.delete_object(Bucket=bucket, Key=key, IfMatch=tag)
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") != "NotImplemented":
                    raise
                log.warning("%s: the store does not support conditional deletes; deleted after comparing", uri)
                client.delete_object(Bucket=bucket, Key=key)
        else:
            client.put_object(Bucket=bucket, Key=key, Body=data, IfMatch=tag)
        return True
    except ClientError as e:
        if _s3_condition_failed(e) or e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return False
        raise StorageError(f"{uri}: conditional {'delete' if data is None else 'write'} failed "
                           f"({e.response.get('Error', {}).get('Code') or e})") from None


def _local_swap(path: str, tag: str, data: bytes | None) -> bool:
    """Local compare-and-swap: the swapper first creates a claim named after the expected content's
    tag with ``O_EXCL``, so of all swappers of one content exactly one proceeds; under the claim it
    compares the file with the tag and replaces it atomically (``os.replace``: the path never goes
    missing, so no create-if-absent slips in) or deletes it. A claim left by a swapper killed in between
    blocks further swaps of that content (False) until it is deleted."""
    claim = os.path.join(os.path.dirname(path), f".{os.path.basename(path).lstrip('.')}.cas-{tag[:16]}")
    try:
        os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except (FileExistsError, FileNotFoundError):  # another swapper holds the claim; or no folder, no file
        return False
    try:
        try:
            with open(path, "rb") as f:
                if hashlib.sha256(f.read()).hexdigest() != tag:
                    return False
        except FileNotFoundError:
            return False
        if data is None:
            os.remove(path)
        else:
            write_bytes(path, data)
        return True
    finally:
        os.remove(claim)


@lru_cache(maxsize=16)
def _boto3(endpoint_url: str | None, region: str | None):
    """A boto3 S3 client with the same endpoint and region as :func:`_s3` (credentials: the AWS chain)."""
    import boto3
    endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = region or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"
    return boto3.client("s3", endpoint_url=endpoint_url, region_name=region)


def exists(uri: str, endpoint_url: str | None = None, region: str | None = None) -> bool:
    fs, path = resolve(uri, endpoint_url, region)
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except Exception as e:
        raise _wrap(uri, e) from None


def is_dir(uri: str, endpoint_url: str | None = None, region: str | None = None) -> bool:
    fs, path = resolve(uri, endpoint_url, region)
    try:
        return fs.get_file_info(path).type == pafs.FileType.Directory
    except Exception as e:
        raise _wrap(uri, e) from None


def holds_anything(uri: str, endpoint_url: str | None = None, region: str | None = None) -> bool:
    """Whether anything is at ``uri``: a file, or a folder (prefix) with at least one entry in it. One
    listing request of at most one key on S3, one folder read locally."""
    _, path = resolve(uri, endpoint_url, region)
    try:
        if not is_s3(uri):
            if os.path.islink(path) or not os.path.isdir(path):
                return os.path.lexists(path)
            with os.scandir(path) as it:
                return any(True for _ in it)
        bucket, _, key = uri[len("s3://"):].partition("/")
        key = key.rstrip("/")
        for prefix in (key + "/", key) if key else ("",):
            found = _boto3_s3(endpoint_url, region).list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
            if found.get("KeyCount", 0) and (prefix != key or found["Contents"][0]["Key"] == key):
                return True
        return False
    except Exception as e:
        raise _wrap(uri, e) from None


def list_files(uri: str, extensions: tuple[str, ...] | None = None, endpoint_url: str | None = None,
               region: str | None = None) -> list[tuple[str, str]]:
    """All files under ``uri`` (recursive), sorted, as (full URI, path relative to ``uri``)."""
    t = list_table(uri, extensions, endpoint_url, region)
    return list(zip(t.column("uri").to_pylist(), t.column("rel").to_pylist()))


# A listing as Arrow: one row per file. Listings build it in record batches of LISTING_BATCH rows
# (never a Python object per file), so memory is the Arrow columns plus one batch.
LISTING_SCHEMA = pa.schema([("uri", pa.string()), ("rel", pa.string()), ("size", pa.int64()), ("mtime", pa.float64()),
                            ("ctime", pa.float64()), ("etag", pa.string()), ("error", pa.string())])
LISTING_BATCH = 16384


class _Columns:
    """Listed files gathered column by column and flushed as record batches of LISTING_BATCH rows;
    the URI is ``prefix + rel``."""

    def __init__(self, prefix: str, mtime_ns: bool = False):
        self.prefix, self.batches, self.mtime_ns = prefix, [], mtime_ns  # mtime_ns: add() gets st_mtime_ns
        self.cols: dict[str, list] = {f.name: [] for f in LISTING_SCHEMA if f.name != "uri"}

    def add(self, rel: str, size, mtime, ctime, etag, error) -> None:
        c = self.cols
        c["rel"].append(rel), c["size"].append(size), c["mtime"].append(mtime), c["ctime"].append(ctime)
        c["etag"].append(etag), c["error"].append(error)
        if len(c["rel"]) >= LISTING_BATCH:
            self.flush()

    def flush(self) -> None:
        rel = self.cols["rel"]
        if rel:
            uri = pa.array([self.prefix + r for r in rel], pa.string())
            cols = dict(self.cols, mtime=_mtimes(self.cols["mtime"]) if self.mtime_ns else self.cols["mtime"])
            self.batches.append(pa.RecordBatch.from_arrays(
                [uri] + [pa.array(cols[f.name], f.type) for f in LISTING_SCHEMA if f.name != "uri"],
                schema=LISTING_SCHEMA))
            for v in self.cols.values():  # cleared in place: the listing appends to these very lists
                v.clear()

    def table(self) -> pa.Table:
        """Every batch, as one table sorted by URI."""
        self.flush()
        t = pa.Table.from_batches(self.batches, schema=LISTING_SCHEMA)
        self.batches = []
        return t if is_sorted(t.column("uri")) else t.take(pc.sort_indices(t, [("uri", "ascending")]))


def is_sorted(values: pa.ChunkedArray | pa.Array, strict: bool = False) -> bool:
    """Whether ``values`` (no nulls) are in ascending order (``strict``: and distinct); one pass, no copy."""
    chunks = [c for c in (values.chunks if isinstance(values, pa.ChunkedArray) else [values]) if len(c)]
    cmp = pc.less if strict else pc.less_equal
    for i, c in enumerate(chunks):  # within each chunk (slices of one array: no copy), then across chunks
        if len(c) > 1 and not pc.all(cmp(c[:-1], c[1:])).as_py():
            return False
        if i and not cmp(chunks[i - 1][-1], c[0]).as_py():
            return False
    return True


def list_entries(uri: str, extensions: tuple[str, ...] | None = None, endpoint_url: str | None = None,
                 region: str | None = None) -> list[dict]:
    """:func:`list_table` as dicts (one per file): for small folders and the tests."""
    return list_table(uri, extensions, endpoint_url, region).to_pylist()


def list_table(uri: str, extensions: tuple[str, ...] | None = None, endpoint_url: str | None = None,
               region: str | None = None) -> pa.Table:
    """All files under ``uri`` (recursive), sorted by URI, as a LISTING_SCHEMA table: uri, rel (path
    relative to ``uri``), size, mtime, ctime (local files: the status change time, which no tool can
    set back; else null), etag (S3 objects: the ETag, which changes with the content; else null), and
    error: null, or why the file cannot be read by its name (the jobs give it an error row without
    reading it). Built in record batches (:class:`_Columns`), never a Python object per file.

    ctime and etag come from the listing itself, with no read of any file: on local disks the
    ``os.stat`` the walk makes anyway, on S3 the ETag that ``ListObjectsV2`` returns with every key
    (pyarrow's listing drops it, so S3 folders are listed through boto3, page by page; same requests).

    Local folders follow the link policy of :func:`_local_files` (no loops, nothing outside the root,
    each file once; FIFOs, sockets and devices skipped with a log line). Temporary files of our own
    interrupted writes (``.<name>.tmp-<hex>``) are skipped, nothing else. Raises FileNotFoundError
    when ``uri`` does not exist.
    """
    fs, root = resolve(uri, endpoint_url, region)
    # Normalised, so that the same file always gets the same URI (one row per image across runs).
    # An S3 key is kept as it is (join would merge its empty segments).
    base = uri.rstrip("/") if is_s3(uri) else ("file://" + root if uri.startswith("file://") else root)
    local = isinstance(fs, pafs.LocalFileSystem)
    out = _Columns(base if base.endswith("/") and not is_s3(uri) else base + "/", mtime_ns=local)
    try:
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"not found: {uri}")
        if info.type == pafs.FileType.File:
            return _single_file(uri, root, info, endpoint_url, region)
        if local:
            _local_files(root, extensions, out)
        else:
            _object_files(uri, root, extensions, endpoint_url, region, out)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise _wrap(uri, e) from None
    return out.table()


def _single_file(uri: str, root: str, info, endpoint_url: str | None, region: str | None) -> pa.Table:
    """The listing of a URI that names one file."""
    mtime = info.mtime.timestamp() if info.mtime is not None else None
    full = uri if is_s3(uri) or uri.startswith("file://") else root
    ctime = None if is_s3(uri) else os.stat(root).st_ctime
    etag = _s3_listing(uri, endpoint_url, region)[2][0][4] if is_s3(uri) else None
    return pa.Table.from_pylist([{"uri": full, "rel": posixpath.basename(root), "size": info.size, "mtime": mtime,
                                  "ctime": ctime, "etag": etag, "error": None}], schema=LISTING_SCHEMA)


def _wanted(rel: str, extensions: tuple[str, ...] | None) -> bool:
    """A listed name the caller asked for: its extension, and not one of our temporary files."""
    name = posixpath.basename(rel)
    return not _TMP.match(name) and (not extensions or name.lower().endswith(extensions))


ODD_KEY = ("object key has an empty, '.' or '..' segment, which the S3 client cannot address exactly (it would "
           "read another object): rename the object")


def _object_files(uri: str, root: str, extensions: tuple[str, ...] | None, endpoint_url: str | None,
                  region: str | None, out: _Columns) -> None:
    """Objects under a bucket prefix, with their ETags, page by page into ``out``. A key with an empty,
    ``.`` or ``..`` segment (``a//b.png``, ``a/./b.png``) cannot be addressed exactly through the S3
    client, which would read another key or none: such an object gets an error."""
    for page in _s3_pages(uri, endpoint_url, region):
        for path, size, mtime, _, etag in page:
            if not _wanted(path, extensions):
                continue
            key = path.split("/", 1)[1] if "/" in path else ""
            odd = any(part in ("", ".", "..") for part in key.split("/"))
            out.add(path[len(root) + 1:], size, mtime, None, etag, ODD_KEY if odd else None)


def file_mtime(st: os.stat_result) -> float:
    """A modification time exactly as pyarrow's file info reports it (microseconds, rounded)."""
    return _dt.datetime.fromtimestamp(st.st_mtime_ns / 1e9, _dt.timezone.utc).timestamp()


def _mtimes(ns: list[int]) -> list[float]:
    """Modification times (``st_mtime_ns``) exactly as pyarrow's file info reports them, i.e. as
    ``datetime.fromtimestamp(ns / 1e9, utc).timestamp()`` gives them, bit for bit, for many at once
    (seconds split as ``datetime`` does, the microseconds rounded half to even)."""
    import numpy as np
    x = np.asarray(ns, np.int64) / 1e9
    whole = np.floor(x)
    us = np.round((x - whole) * 1e6).astype(np.int64)
    return ((whole.astype(np.int64) * 1_000_000 + us) / 1_000_000).tolist()


NOT_UTF8 = "file name is not valid UTF-8 (shown with \\x escapes, a backslash doubled)"


def _text_name(rel: str) -> tuple[str, str | None]:
    """A relative path as text: itself, or (for bytes that are not UTF-8) with those bytes escaped as
    ``\\xNN`` and each backslash doubled (so two such names never show alike), and the error of a
    file that cannot be stored or read by its name."""
    try:
        rel.encode("utf-8")
        return rel, None
    except UnicodeEncodeError:
        raw = rel.encode("utf-8", "surrogateescape").replace(b"\\", b"\\\\")
        return raw.decode("utf-8", "backslashreplace"), f"{NOT_UTF8}: rename the file to score it"


def _distinct(escaped: list[dict], valid: pa.ChunkedArray | pa.Array) -> list[dict]:
    """The entries with an escaped name (``escaped``, in listing order) that another listed file has as
    its own name (``bad\\xff.png`` beside ``bad<0xff>.png``) renamed with a hash of their bytes: every
    entry has its own URI. ``valid``: the relative paths of the files with valid names, which always
    keep their own (the job reads them by that name)."""
    names = pa.array([e["rel"] for e in escaped], pa.string())
    clash = set(pc.filter(names, pc.is_in(names, value_set=valid)).to_pylist()) if len(valid) else set()
    taken = {e["rel"] for e in escaped} | clash
    counts: dict[str, int] = {}
    for e in escaped:
        counts[e["rel"]] = counts.get(e["rel"], 0) + 1
    for rel in clash:
        counts[rel] += 1
    for e in escaped:
        raw = e.pop("raw")
        if counts[e["rel"]] == 1:
            continue
        counts[e["rel"]] -= 1
        stem, ext = posixpath.splitext(e["rel"])
        rel, n = f"{stem}~{_name_hash(raw)}{ext}", 1
        while rel in taken or (len(valid) and pc.any(pc.equal(valid, rel)).as_py()):
            n += 1
            rel = f"{stem}~{_name_hash(raw)}-{n}{ext}"
        taken.add(rel)
        e["rel"] = rel
        e["error"] = (f"{NOT_UTF8}, and a hash of its bytes added, as another file has the escaped name: rename the "
                      "file to score it")
    return escaped


def _local_files(root: str, extensions: tuple[str, ...] | None, out: _Columns) -> None:
    """Files under a local folder, into ``out``. Link policy: directory links are never followed (a
    target inside the root is listed under its real path; one outside is out of scope), so the walk
    terminates and nothing outside the root is read. A file link is listed when its target lies inside
    the root and is not listed already (under its own name or an earlier link); a link out of the root
    or a broken one is an error. FIFOs, sockets and devices are skipped with a log line (opening a FIFO
    would block). Regular files go straight into ``out`` (their inodes into two integer arrays, for the
    links); links and names that are not UTF-8 (rare) are kept aside and added at the end."""
    import array
    real_root = os.path.realpath(root)
    links, escaped = [], []
    devs, inos = array.array("q"), array.array("q")
    c = out.cols  # the common case appends to the columns directly (no call per file)
    rels, sizes, mtimes, ctimes, etags, errors = (c[k].append for k in ("rel", "size", "mtime", "ctime", "etag",
                                                                        "error"))
    add_dev, add_ino = devs.append, inos.append
    for rel, entry in _walk(root):
        name = entry.name
        if entry.is_symlink():
            links.append((rel, entry.path))
        elif (extensions and not name.lower().endswith(extensions)) or (name[0] == "." and _TMP.match(name)):
            continue
        elif entry.is_file(follow_symlinks=False):
            st = entry.stat(follow_symlinks=False)
            add_dev(st.st_dev), add_ino(st.st_ino)
            if rel.isascii():  # the common case: a valid name, as it is
                rels(rel), sizes(st.st_size), mtimes(st.st_mtime_ns), ctimes(st.st_ctime), etags(None), errors(None)
                if len(c["rel"]) >= LISTING_BATCH:
                    out.flush()
            else:
                _add(out, escaped, rel, st)
        else:
            log.warning("skipped %r: not a regular file (%s)", rel, _kind(entry))
    seen = _linked_inodes(links, devs, inos)
    for rel, path in links:
        _link_entry(rel, path, real_root, seen, extensions, out, escaped)
    if not escaped:
        return
    out.flush()
    valid = pa.chunked_array([b.column("rel") for b in out.batches], pa.string())
    for e in _distinct(escaped, valid):
        out.add(e["rel"], e["size"], e["mtime_ns"], e["ctime"], None, e["error"])


def _linked_inodes(links: list, devs, inos) -> set:
    """The (device, inode) pairs of listed regular files that some link points to: the only ones the
    link policy needs to know (a Python set of every file's inode would be an object per file)."""
    if not links:
        return set()
    import numpy as np
    targets = set()
    for _, path in links:
        try:
            st = os.stat(path)
            targets.add((st.st_dev, st.st_ino))
        except OSError:
            pass
    d, i = np.frombuffer(devs, np.int64), np.frombuffer(inos, np.int64)
    hit = np.isin(i, np.array([t[1] for t in targets], np.int64))
    return {(int(a), int(b)) for a, b in zip(d[hit], i[hit])} & targets


_NAME = operator.attrgetter("name")


def _walk(root: str):
    """(relative path, os.DirEntry) of everything under ``root`` but directories, without entering
    links. One folder's entries at a time are held (sorted by name)."""
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        try:
            with os.scandir(os.path.join(root, rel_dir)) as it:
                entries = sorted(it, key=_NAME)
        except OSError as e:
            if not rel_dir:
                raise
            log.warning("cannot list the folder %r: %s", rel_dir, e.strerror or e)
            continue
        prefix, folders = (rel_dir + "/" if rel_dir else ""), []
        for entry in entries:
            rel = prefix + entry.name
            if entry.is_dir(follow_symlinks=False):
                folders.append(rel)
            else:
                yield rel, entry
        stack.extend(reversed(folders))  # folders in name order: a tree of folders of files comes out sorted


def _add(out: _Columns, escaped: list, rel: str, st: os.stat_result, error: str | None = None) -> None:
    """A listed file: into ``out``, or (a name that had to be escaped) into ``escaped`` with ``raw``,
    the name as it is, for :func:`_distinct`."""
    shown, name_error = _text_name(rel)
    if name_error:
        escaped.append({"rel": shown, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime": st.st_ctime,
                        "error": name_error, "raw": rel})
    else:
        out.add(shown, st.st_size, st.st_mtime_ns, st.st_ctime, None, error)


def _link_entry(rel: str, path: str, real_root: str, seen: set, extensions: tuple[str, ...] | None,
                out: _Columns, escaped: list) -> None:
    """The entry of a symbolic link under the policy of :func:`_local_files`, if it is listed."""
    target = os.path.realpath(path)
    inside = target == real_root or target.startswith(real_root.rstrip(os.sep) + os.sep)
    try:
        st = os.stat(path)
    except OSError:
        if _wanted(rel, extensions):
            _add(out, escaped, rel, os.lstat(path), "broken symbolic link (its target does not exist)")
        return
    if stat.S_ISDIR(st.st_mode):
        log.warning("directory link %r not followed (%s)", rel, "its folder is listed under its real path" if inside
                    else "it leads out of the input root")
        return
    if not _wanted(rel, extensions):
        return
    if not inside:
        _add(out, escaped, rel, os.lstat(path), "symbolic link to a file outside the input root: not followed")
    elif not stat.S_ISREG(st.st_mode):
        log.warning("skipped %r: a link to something that is not a regular file", rel)
    elif (st.st_dev, st.st_ino) in seen:
        log.info("link %r not listed: its file is listed already", rel)
    else:
        seen.add((st.st_dev, st.st_ino))
        _add(out, escaped, rel, st)


def _kind(entry: os.DirEntry) -> str:
    mode = entry.stat(follow_symlinks=False).st_mode
    return ("FIFO" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode)
            else "device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "special file")


def relative_to(inner: str, outer: str) -> str | None:
    """``inner``'s path relative to ``outer`` when it lies inside it ("" for the same location), else None.
    Local paths are compared after resolving links."""
    if is_s3(inner) != is_s3(outer):
        return None
    if is_s3(inner):
        a, b = inner[5:].rstrip("/"), outer[5:].rstrip("/")
    else:
        a, b = (os.path.realpath(resolve(u)[1]) for u in (inner, outer))
    if a == b:
        return ""
    return a[len(b):].lstrip("/") if a.startswith(b.rstrip("/") + "/") else None


@lru_cache(maxsize=16)
def _boto3_s3(endpoint_url: str | None, region: str | None):
    import boto3
    endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return boto3.client("s3", endpoint_url=endpoint_url, region_name=region or os.environ.get("AWS_DEFAULT_REGION")
                        or os.environ.get("AWS_REGION") or "us-east-1")


def _s3_pages(uri: str, endpoint_url: str | None, region: str | None):
    """The objects under the prefix ``uri`` names, one ListObjectsV2 page (up to 1,000 keys) at a time:
    lists of ("bucket/key", size, mtime, None, etag); "folder" marker objects are not files."""
    client = _boto3_s3(endpoint_url, region)
    bucket, _, key = uri[len("s3://"):].partition("/")
    key = key.rstrip("/")
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key + "/" if key else ""):
        yield [(f"{bucket}/{o['Key']}", o["Size"], o["LastModified"].timestamp(), None, o.get("ETag"))
               for o in page.get("Contents", []) if not o["Key"].endswith("/")]


def _s3_listing(uri: str, endpoint_url: str | None, region: str | None) -> tuple[bool, str, list[tuple]]:
    """(uri is a single object, "bucket/prefix", [("bucket/key", size, mtime, None, etag)]) from
    ListObjectsV2 pages; a HEAD only when ``uri`` may name one object rather than a prefix. For small
    prefixes and single objects (the listing of a folder goes page by page: :func:`_s3_pages`)."""
    client = _boto3_s3(endpoint_url, region)
    bucket, _, key = uri[len("s3://"):].partition("/")
    key = key.rstrip("/")
    found = [o for page in _s3_pages(uri, endpoint_url, region) for o in page]
    root = (bucket + "/" + key).rstrip("/")
    if found or not key:
        return False, root, found
    try:
        h = client.head_object(Bucket=bucket, Key=key)
    except Exception as e:
        if "404" in str(e) or "Not Found" in str(e):
            raise FileNotFoundError(f"not found: {uri}") from None
        raise
    return True, posixpath.dirname(root), [(root, h["ContentLength"], h["LastModified"].timestamp(), None, h.get("ETag"))]


def delete(uri: str, endpoint_url: str | None = None, region: str | None = None) -> None:
    fs, path = resolve(uri, endpoint_url, region)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass
    except Exception as e:
        if "NoSuchKey" not in str(e):
            raise _wrap(uri, e) from None


_TMP = re.compile(r"^\..*\.tmp-[0-9a-f]{8}$")
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_relpath(rel: str, max_part: int = 120) -> str:
    """A relative output key derived from an input name that cannot escape its prefix and never
    collides with another input's.

    ``..``, ``.``, empty and absolute components are dropped, backslashes split components, odd
    characters are replaced and long components shortened. When this changed the name at all, a hash
    of the whole original relative path is added to the last component (``a/./b.png``, ``a//b.png``,
    ``a\\b.png`` and ``a/b.png`` are four keys). A name that already ends like a hashed key
    (``-`` and 16 hex digits before its extension) gets a hash too, so no input's key is another's.
    """
    parts = []
    for p in rel.replace("\\", "/").split("/"):
        if p in ("", ".", ".."):
            continue
        clean = _SAFE.sub("_", p).lstrip(".") or "_"
        if len(clean) > max_part:
            stem, ext = os.path.splitext(clean)
            ext = ext if len(ext) <= 10 else ""
            clean = stem[: max_part - 17 - len(ext)] + "-" + _name_hash(p) + ext
        parts.append(clean)
    out = "/".join(parts) or "_"
    if out != rel or _HASHED.search(out):  # a name that looks hashed is hashed too: keys never coincide
        head, _, last = out.rpartition("/")
        stem, ext = os.path.splitext(last)
        ext = ext if len(ext) <= 10 else ""
        stem = stem[: max(1, max_part - 17 - len(ext))] if ext else last[: max_part - 17]
        out = (head + "/" if head else "") + f"{stem}-{_name_hash(rel)}{ext}"
    return out


_HASHED = re.compile(r"-[0-9a-f]{16}(\.[^/]{0,10})?$")


def _name_hash(name: str) -> str:
    return hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def parquet_bytes(table: pa.Table, **write_options) -> bytes:
    """A table as Parquet file bytes (zstd unless told otherwise), ready for :func:`write_bytes`."""
    import io
    import pyarrow.parquet as pq
    buf = io.BytesIO()
    pq.write_table(table, buf, **{"compression": "zstd", **write_options})
    return buf.getvalue()


def read_parquet(uri: str, **storage_options) -> pa.Table:
    """A whole Parquet file read through :func:`read_bytes` (one request, any scheme)."""
    import io
    import pyarrow.parquet as pq
    return pq.read_table(io.BytesIO(read_bytes(uri, **storage_options)))
