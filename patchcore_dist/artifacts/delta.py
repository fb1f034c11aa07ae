"""Delta Lake tables on our storage (local path, ``file://``, ``s3://``) through delta-rs (``deltalake``).

A table is Parquet data files plus a log (``_delta_log/<version>.json``); a version is committed by
creating its log entry only if it does not exist yet: on local disks an atomic rename that never
replaces, on S3 a conditional PUT (``If-None-Match``, in AWS S3 since 2024; an S3-compatible store
must support it too: MinIO, Ceph RGW and moto do). So two writers never overwrite each other's
commit; a writer whose snapshot was overtaken by a conflicting commit gets ``CommitFailedError``
and redoes its work on the new version (:func:`retry_commits`). Readers see the files of one
version only: files that no version references (a crashed writer's leftovers, foreign files) are
never read; :func:`vacuum` removes the leftovers (files named as the table names its data files, in
its partition folders) and nothing else.

Locations: delta-rs takes a table location as a URL, so an S3 key is percent-encoded for it and the
file URIs it returns are decoded before pyarrow opens them. A location whose path holds a '%'
followed by two hex digits is refused: delta-rs (1.6) decodes such a path twice when it reads the
log and once when it writes it, so it would read the table from another place than it writes it to.
"""
from __future__ import annotations

import logging
import math
import os
import random
import re
import time
from urllib.parse import quote, unquote

import pyarrow as pa
import pyarrow.dataset as pads

from ..errors import JobError, StorageError
from . import storage

log = logging.getLogger(__name__)

COMMIT_ATTEMPTS = 8             # whole-operation retries after a conflicting concurrent commit
CONFIGURATION = {               # written into every table we create
    "delta.deletedFileRetentionDuration": "interval 7 days",   # vacuum keeps removed files this long
    "delta.logRetentionDuration": "interval 30 days",          # versions readable (time travel) at most this long
}


def location(uri: str, opts: dict) -> tuple[str, dict]:
    """(table URI for delta-rs, its storage options). Credentials are not among them: delta-rs takes
    them from the standard AWS environment (variables, profiles, instance roles), as the rest of the jobs do.
    A local table is given as its path; an S3 one as a URL, its key percent-encoded (a space, '#', '?'
    or a non-ASCII letter in it is then the key's own). A StorageError for a location delta-rs cannot
    use (see the module's docstring)."""
    if not storage.is_s3(uri):
        path = storage.resolve(uri)[1]
        for p in dict.fromkeys((path, os.path.realpath(path))):
            _refuse_escapes(uri, p)
        return path, {}
    bucket, _, key = uri[len("s3://"):].partition("/")
    _refuse_escapes(uri, key)
    endpoint = (opts.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"))
    so = {"AWS_REGION": opts.get("region") or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
          or "us-east-1"}
    if endpoint:
        so["AWS_ENDPOINT_URL"] = endpoint
        if endpoint.startswith("http://"):
            so["AWS_ALLOW_HTTP"] = "true"
    return f"s3://{bucket}/{quote(key.rstrip('/'), safe='/')}", so


_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")


def _refuse_escapes(uri: str, path: str) -> None:
    m = _ESCAPE.search(path)
    if m:
        shown = "" if path == uri or path.endswith(uri) else f" (its path {path})"
        raise StorageError(f"the table location {uri}{shown} holds '{m.group()}', which the Delta Lake library "
                           "(delta-rs) reads as a percent-escape: it would write the table to one path and read it "
                           "from another. Choose an output whose path has no '%' followed by two hex digits")


def load(uri: str, opts: dict, version: int | str | None = None):
    """The Delta table at ``uri`` (at ``version``: a number, or an ISO 8601 time), or None if there is none."""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError
    table_uri, so = location(uri, opts)
    try:
        dt = DeltaTable(table_uri, storage_options=so)
        if version is not None:
            dt.load_as_version(version)
        return dt
    except TableNotFoundError:
        return None
    except Exception as e:  # delta-rs raises its own errors and plain Exceptions with the backend's message
        raise StorageError(f"cannot read the Delta table {uri}: {_first_line(e)}") from None


def create(uri: str, opts: dict, schema: pa.Schema, partition_by: list[str]):
    """The table at ``uri``, created empty with ``schema`` if it does not exist (two runs creating it
    at once: one creates it, the other loads it)."""
    from deltalake import DeltaTable

    def attempt():
        dt = load(uri, opts)
        if dt is not None:
            return dt
        table_uri, so = location(uri, opts)
        return DeltaTable.create(table_uri, schema, mode="ignore", partition_by=partition_by,
                                 configuration=CONFIGURATION, storage_options=so)
    return retry_commits(attempt, f"creating the Delta table {uri}")


# Delta's primitive type of each Arrow type the tables use (for columns added to existing tables).
_DELTA_TYPES = {pa.float64(): "double", pa.float32(): "float", pa.string(): "string", pa.bool_(): "boolean",
                pa.int32(): "integer", pa.int64(): "long", pa.timestamp("us", tz="UTC"): "timestamp"}


def add_missing_columns(uri: str, opts: dict, schema: pa.Schema) -> list[str]:
    """Schema evolution: the columns of ``schema`` that the table at ``uri`` lacks (a table written by
    an earlier version) added as nullable columns, in one commit (the rows it holds read them as null;
    the protocol stays 1 / 2). Returns the names added."""
    from deltalake.schema import Field, PrimitiveType

    def attempt():
        dt = load(uri, opts)
        have = {f.name for f in dt.schema().fields}
        missing = [f for f in schema if f.name not in have]
        if missing:
            dt.alter.add_columns([Field(f.name, PrimitiveType(_DELTA_TYPES[f.type]), nullable=True) for f in missing])
        return [f.name for f in missing]
    added = retry_commits(attempt, f"adding columns to the Delta table {uri}")
    if added:
        log.info("score table %s: added the column(s) %s (rows written before read them as null)", uri,
                 ", ".join(added))
    return added


def retry_commits(fn, what: str, attempts: int | None = None):
    """``fn()``, called again (on a freshly loaded table: ``fn`` loads it) while a concurrent commit
    conflicts with it, up to COMMIT_ATTEMPTS times with a random back-off; a clear JobError when it
    never gets through."""
    from deltalake.exceptions import CommitFailedError
    attempts = attempts or COMMIT_ATTEMPTS
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except CommitFailedError as e:
            if attempt == attempts:
                raise JobError(f"{what}: gave up after {attempts} attempts, each overtaken by a concurrent commit "
                               f"to the same table ({_first_line(e)}); rows committed before are kept, run the job "
                               "again to complete it") from None
            log.info("%s: a concurrent commit came first; retrying on the new version (attempt %d of %d)",
                     what, attempt + 1, attempts)
            time.sleep(random.uniform(0.05, min(5.0, 0.2 * 2 ** attempt)))


def dataset(dt, uri: str, opts: dict, schema: pa.Schema, where: list | None = None) -> pads.Dataset:
    """The live data files of ``dt`` (those its version references, selected by the partition
    filter ``where``) as a pyarrow dataset of ``schema`` (columns a file lacks read as null)."""
    fs, _ = storage.resolve(uri, **opts)
    files = dt.file_uris(file_pruning_predicate=where) if where else dt.file_uris()
    return pads.dataset([_file_path(f) for f in files], schema=schema, format="parquet", filesystem=fs)


def _file_path(file_uri: str) -> str:
    """A data file's URI as delta-rs gives it (percent-encoded) as a path for pyarrow's filesystem."""
    path = unquote(file_uri)
    for scheme in ("s3://", "file://"):
        if path.startswith(scheme):
            return path[len(scheme):]
    return path


def read(ds: pads.Dataset, uri: str, **scan) -> pa.Table:
    """``ds.to_table(**scan)``; a file that cannot be read is a StorageError naming it and the recovery."""
    try:
        return ds.to_table(**scan)
    except (OSError, pa.ArrowException) as e:
        raise unreadable(ds, uri, e, scan.get("columns")) from None


def unreadable(ds: pads.Dataset, uri: str, e: Exception, columns: list[str] | None = None) -> StorageError:
    """The StorageError for data files of the table that cannot be read: each such file, found by
    reading the files one by one, and what to do about it. Deleting a file and ``--repair`` is the
    recovery for a file that is missing or corrupt only: a file that failed for another reason
    (permission, network) is intact, and deleting it would lose its rows for nothing."""
    damaged, failed = [], []
    for frag in ds.get_fragments():
        try:
            frag.to_table(schema=ds.schema, columns=columns)
        except (OSError, pa.ArrowException) as fe:
            (damaged if _damaged(fe) else failed).append(f"{frag.path} ({_first_line(fe)})")
    said = []
    if damaged:
        said.append(f"the Delta table {uri} references data files that cannot be read: {'; '.join(damaged)}. "
                    "Recovery: restore each file from a backup, or delete it and run `patchcore maintain --output "
                    "<output> --repair`, which drops it from the table (its rows are lost; the next score run scores "
                    "those images again)")
    if failed:
        said.append(f"data files of the Delta table {uri} could not be read: {'; '.join(failed)}. The files are not "
                    "missing nor corrupt (a permission, network or storage error): fix the access and run again; do "
                    "not delete them")
    if not said:
        said.append(f"reading the Delta table {uri} failed ({_first_line(e)}), but each of its data files reads "
                    "when tried again: the failure looks transient, run again")
    return StorageError("; ".join(said))


def _damaged(e: Exception) -> bool:
    """Whether a read error says the file is missing or its content is not valid Parquet (rather than
    that the read itself failed: permission, network, throttling)."""
    if isinstance(e, FileNotFoundError):
        return True
    if isinstance(e, PermissionError):
        return False
    if isinstance(e, pa.ArrowInvalid):  # not Parquet, truncated, bad metadata or pages
        return True
    msg = str(e)
    return "Path does not exist" in msg or "NoSuchKey" in msg or "No such file" in msg


def compact(dt, uri: str, where: list | None = None) -> dict | None:
    """OPTIMIZE (bin-packing compaction) of the partitions matching ``where``; a concurrent commit
    that overtakes it only postpones it (None)."""
    from deltalake.exceptions import CommitFailedError
    try:
        metrics = dt.optimize.compact(partition_filters=where)
    except CommitFailedError as e:
        log.info("compaction of %s postponed: a concurrent commit came first (%s)", uri, _first_line(e))
        return None
    log.log(logging.INFO if metrics["numFilesRemoved"] else logging.DEBUG, "compacted %s: %d small files into %d", uri,
            metrics["numFilesRemoved"], metrics["numFilesAdded"])
    return metrics


def retention(hours) -> int:
    """A vacuum retention in whole hours, as delta-rs takes it: a positive finite number, a fraction
    rounded up (never less than asked: 0.5 once truncated to 0 and deleted a running job's data file)."""
    if isinstance(hours, bool) or not isinstance(hours, (int, float)) or not math.isfinite(hours) or hours <= 0:
        raise JobError(f"the vacuum retention must be a positive number of hours, got {hours!r}")
    return math.ceil(hours)


# Data files as delta-rs names them (and as earlier delta-rs versions did); nothing else is the table's.
_DATA_FILE = re.compile(r"(part-\d{5}-[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}-c\d{3}(\.[a-z0-9]+)?"
                        r"|\d+-[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}-\d+)\.parquet")


def vacuum(dt, uri: str, opts: dict, retention_hours: float) -> list[str]:
    """Delete the table's own data files that its current version does not reference and that are
    older than ``retention_hours`` (rounded up to whole hours): removed files of earlier versions
    (time travel to those versions ends) and a crashed writer's leftovers. Only files named as the
    table names its data files, directly in its partition folders, are deleted: a user's file in the
    folder stays. A symbolic link anywhere in a local table's folder is refused before anything is
    deleted (a link is never followed). Returns the deleted files, relative to the table."""
    hours = retention(retention_hours)
    local = not storage.is_s3(uri)
    root = storage.resolve(uri)[1] if local else None
    if local:
        _refuse_links(uri, root)
    partitions = dt.metadata().partition_columns
    unused = dt.vacuum(retention_hours=hours, dry_run=True, enforce_retention_duration=False, full=True)
    own = sorted(rel for rel in unused if _own_data_file(rel, partitions))
    for rel in own:
        if local:
            _delete_local(uri, root, rel)
        else:
            storage.delete(storage.join(uri, rel), **opts)
    if len(own) < len(unused):
        log.info("vacuum of %s: kept %d file(s) that are not the table's data files", uri, len(unused) - len(own))
    return own


def _own_data_file(rel: str, partitions: list[str]) -> bool:
    """A path (relative to the table) of one of the table's data files: in the folder of one value of
    each partition column, in their order, with a data file's name."""
    parts = rel.split("/")
    if len(parts) != len(partitions) + 1 or not _DATA_FILE.fullmatch(parts[-1]):
        return False
    return all(p.startswith(col + "=") and len(p) > len(col) + 1 for p, col in zip(parts, partitions))


def _refuse_links(uri: str, root: str) -> None:
    """A StorageError naming the first symbolic link under a local table's folder, if there is one."""
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except FileNotFoundError:
            continue
        for entry in entries:
            if entry.is_symlink():
                raise StorageError(f"{entry.path} is a symbolic link inside the Delta table {uri}: the vacuum never "
                                   "follows links nor deletes what they lead to, and does not run with one there. "
                                   "Move or remove the link (what it points to stays) and run maintain again")
            if entry.is_dir(follow_symlinks=False):
                stack.append(entry.path)


def _delete_local(uri: str, root: str, rel: str) -> None:
    """Delete one data file of a local table, checking again that no link leads out of the table."""
    path = os.path.join(root, *rel.split("/"))
    real_root = os.path.realpath(root)
    if os.path.islink(path) or os.path.realpath(path) != os.path.join(real_root, *rel.split("/")):
        raise StorageError(f"{path} is a symbolic link or lies behind one inside the Delta table {uri}: not deleted")
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _first_line(e: Exception) -> str:
    msg = str(e).strip()
    return msg.splitlines()[0] if msg else type(e).__name__
