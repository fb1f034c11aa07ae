"""URIs and filesystems: local paths, ``file://`` and ``s3://bucket/prefix``, all through pyarrow.fs.

Writes are atomic for readers: local files are written under a temporary name and renamed; an S3
object becomes visible only when its upload completes. Credentials come from the standard AWS
environment / config files and are never logged.
"""
from __future__ import annotations

import os
import posixpath
import re
import uuid
from functools import lru_cache
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs

from ..errors import StorageError


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


def read_bytes(uri: str, endpoint_url: str | None = None, region: str | None = None) -> bytes:
    fs, path = resolve(uri, endpoint_url, region)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except Exception as e:  # pyarrow raises OSError subclasses with the backend's message
        raise _wrap(uri, e) from None


def write_bytes(uri: str, data: bytes, endpoint_url: str | None = None, region: str | None = None) -> None:
    """Write atomically: readers see the old object / no object, or the whole new one."""
    fs, path = resolve(uri, endpoint_url, region)
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            # Hidden temporary name: Parquet dataset readers and our listings skip dot-files.
            tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:
            with fs.open_output_stream(path) as f:
                f.write(data)
    except Exception as e:
        raise _wrap(uri, e) from None


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


def list_files(uri: str, extensions: tuple[str, ...] | None = None, endpoint_url: str | None = None,
               region: str | None = None) -> list[tuple[str, str]]:
    """All files under ``uri`` (recursive), sorted, as (full URI, path relative to ``uri``)."""
    return [(e["uri"], e["rel"]) for e in list_entries(uri, extensions, endpoint_url, region)]


def list_entries(uri: str, extensions: tuple[str, ...] | None = None, endpoint_url: str | None = None,
                 region: str | None = None) -> list[dict]:
    """All files under ``uri`` (recursive), sorted, as dicts: uri, rel (relative path), size, mtime,
    ctime (local files: the status change time, which no tool can set back; else None) and etag (S3
    objects: the ETag, which changes with the content; else None).

    Both come from the listing itself, with no read of any file: on local disks one ``os.stat`` per
    file (metadata only), on S3 the ETag that ``ListObjectsV2`` returns with every key (pyarrow's
    listing drops it, so S3 is listed through boto3; same requests, no HEAD per object).
    Temporary files of our own interrupted writes (``.<name>.tmp-<hex>``) are skipped, nothing else.
    Raises FileNotFoundError when ``uri`` does not exist.
    """
    try:
        single, root, found = (_s3_listing if is_s3(uri) else _local_listing)(uri, endpoint_url, region)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise _wrap(uri, e) from None
    # Normalised, so that the same file always gets the same URI (one row per image across runs).
    if is_s3(uri):
        base = uri.rstrip("/")
    elif uri.startswith("file://"):
        base = "file://" + root if not single else uri
    else:
        base = root
    out = []
    for path, size, mtime, ctime, etag in found:
        name = posixpath.basename(path)
        if _TMP.match(name) or (extensions and not name.lower().endswith(extensions)):
            continue
        rel = os.path.relpath(path, root) if not is_s3(uri) else path[len(root):].lstrip("/")
        full = join(base, rel) if not single else (path if not is_s3(uri) and not uri.startswith("file://") else uri)
        out.append({"uri": full, "rel": rel, "size": size, "mtime": mtime, "ctime": ctime, "etag": etag})
    return sorted(out, key=lambda e: e["uri"])


def _local_listing(uri: str, endpoint_url: str | None, region: str | None) -> tuple[bool, str, list[tuple]]:
    """(uri is a single file, the root path, [(path, size, mtime, ctime, None)]) through pyarrow's
    listing, plus one ``os.stat`` per file for its change time."""
    fs, root = resolve(uri, endpoint_url, region)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"not found: {uri}")
    single = info.type == pafs.FileType.File
    infos = [info] if single else fs.get_file_info(pafs.FileSelector(root, recursive=True))
    found = []
    for fi in infos:
        if fi.type != pafs.FileType.File:
            continue
        try:
            ctime = os.stat(fi.path).st_ctime
        except OSError:  # gone since it was listed: its row will say so
            ctime = None
        found.append((fi.path, fi.size, fi.mtime.timestamp() if fi.mtime is not None else None, ctime, None))
    return single, (posixpath.dirname(root) if single else root), found


@lru_cache(maxsize=16)
def _boto3_s3(endpoint_url: str | None, region: str | None):
    import boto3
    endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return boto3.client("s3", endpoint_url=endpoint_url, region_name=region or os.environ.get("AWS_DEFAULT_REGION")
                        or os.environ.get("AWS_REGION") or "us-east-1")


def _s3_listing(uri: str, endpoint_url: str | None, region: str | None) -> tuple[bool, str, list[tuple]]:
    """(uri is a single object, "bucket/prefix", [("bucket/key", size, mtime, None, etag)]) from
    ListObjectsV2 pages; a HEAD only when ``uri`` may name one object rather than a prefix."""
    client = _boto3_s3(endpoint_url, region)
    bucket, _, key = uri[len("s3://"):].partition("/")
    key = key.rstrip("/")
    found = []
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key + "/" if key else "")
    for page in pages:
        for o in page.get("Contents", []):
            if not o["Key"].endswith("/"):  # "folder" marker objects are not files
                found.append((f"{bucket}/{o['Key']}", o["Size"], o["LastModified"].timestamp(), None, o.get("ETag")))
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
    """A relative output key derived from an input name that cannot escape its prefix.

    ``..``, ``.``, empty and absolute components are dropped, odd characters replaced, long
    components shortened (with a hash to stay unique).
    """
    import hashlib
    parts = []
    for p in rel.replace("\\", "/").split("/"):
        if p in ("", ".", ".."):
            continue
        clean = _SAFE.sub("_", p).lstrip(".") or "_"
        if clean != p and len(clean) <= max_part:  # keep distinct names distinct ("a b" vs "a_b")
            stem, ext = os.path.splitext(clean)
            clean = f"{stem}-{hashlib.sha256(p.encode()).hexdigest()[:8]}{ext}"
        if len(clean) > max_part:
            stem, ext = os.path.splitext(clean)
            ext = ext if len(ext) <= 10 else ""
            clean = stem[: max_part - 17 - len(ext)] + "-" + hashlib.sha256(p.encode()).hexdigest()[:16] + ext
        parts.append(clean)
    return "/".join(parts) or "_"


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
