"""Delta Lake tables on our storage (local path, ``file://``, ``s3://``) through delta-rs (``deltalake``).

A table is Parquet data files plus a log (``_delta_log/<version>.json``); a version is committed by
creating its log entry only if it does not exist yet: on local disks an atomic rename that never
replaces, on S3 a conditional PUT (``If-None-Match``, in AWS S3 since 2024; an S3-compatible store
must support it too: MinIO, Ceph RGW and moto do). So two writers never overwrite each other's
commit; a writer whose snapshot was overtaken by a conflicting commit gets ``CommitFailedError``
and redoes its work on the new version (:func:`retry_commits`). Readers see the files of one
version only: files that no version references (a crashed writer's leftovers, foreign files) are
never read, and :func:`vacuum` removes them.
"""
from __future__ import annotations

import logging
import os
import random
import time

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
    them from the standard AWS environment (variables, profiles, instance roles), as the rest of the jobs do."""
    if not storage.is_s3(uri):
        return storage.resolve(uri)[1], {}
    endpoint = (opts.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"))
    so = {"AWS_REGION": opts.get("region") or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
          or "us-east-1"}
    if endpoint:
        so["AWS_ENDPOINT_URL"] = endpoint
        if endpoint.startswith("http://"):
            so["AWS_ALLOW_HTTP"] = "true"
    return uri.rstrip("/"), so


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
    paths = [f[len("s3://"):] if storage.is_s3(f) else f for f in files]
    return pads.dataset(paths, schema=schema, format="parquet", filesystem=fs)


def read(ds: pads.Dataset, uri: str, **scan) -> pa.Table:
    """``ds.to_table(**scan)``; a file that cannot be read is a StorageError naming it and the recovery."""
    try:
        return ds.to_table(**scan)
    except (OSError, pa.ArrowException) as e:
        raise unreadable(ds, uri, e, scan.get("columns")) from None


def unreadable(ds: pads.Dataset, uri: str, e: Exception, columns: list[str] | None = None) -> StorageError:
    """The StorageError for a data file of the table that cannot be read: each such file, found by
    reading the files one by one, and what to do about it."""
    bad = []
    for frag in ds.get_fragments():
        try:
            frag.to_table(schema=ds.schema, columns=columns)
        except (OSError, pa.ArrowException) as fe:
            bad.append(f"{frag.path} ({_first_line(fe)})")
    files = "; ".join(bad) if bad else _first_line(e)
    return StorageError(f"the Delta table {uri} references data files that cannot be read: {files}. Recovery: restore "
                        f"each file from a backup, or delete it and run `patchcore maintain --output <output> --repair`, "
                        "which drops it from the table (its rows are lost; the next score run scores those images again)")


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


def vacuum(dt, retention_hours: float) -> list[str]:
    """Delete the files of ``dt``'s folder that its current version does not reference and that are
    older than ``retention_hours``: removed files of earlier versions (time travel to those versions
    ends) and files no version ever referenced (leftovers, foreign files)."""
    return dt.vacuum(retention_hours=int(retention_hours), dry_run=False, enforce_retention_duration=False, full=True)


def _first_line(e: Exception) -> str:
    msg = str(e).strip()
    return msg.splitlines()[0] if msg else type(e).__name__
