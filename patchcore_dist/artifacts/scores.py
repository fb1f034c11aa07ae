"""The score table: a Delta Lake table with one live row per input image and model, and the
patch-score grids in a second, append-only table beside it.

    <output>/scores/         Delta table, partitioned by model (model=<digest>/): the score rows
    <output>/patch_scores/   Delta table, partitioned by model: grids, keyed by (image, model, run)

Each commit is one MERGE on (model, image) (:func:`commit`): a new image is inserted, a re-scored
one replaces its row (unless the row there was scored later), an unchanged one (same digest) only
gets its new file size, times and ETag. Every version of the table therefore holds exactly one row
per image and model, and readers see whole versions only. The incremental plan
(:func:`previous`) reads a few columns of this model's partition in bounded batches, never the
grids. :func:`maintain` converts the Parquet parts of earlier versions, compacts, repairs and vacuums.
"""
from __future__ import annotations

import datetime as _dt
import functools
import logging
import operator
import os
import posixpath
import re
import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import StorageError
from . import delta, legacy_scores, storage

log = logging.getLogger(__name__)

SCORE_SCHEMA = pa.schema([
    ("image", pa.string()),          # input URI
    ("score", pa.float64()),         # image score s* (null when error is set)
    ("normalized_score", pa.float64()),  # 0.5 at the threshold, 0 at normal images' typical level (rows of
                                     # tables written before it existed: null)
    ("is_anomaly", pa.bool_()),      # score > the model's decision threshold (null only for models
                                     # fitted before every fit calibrated one)
    ("heatmap", pa.string()),        # heatmap PNG URI (null when none was written)
    ("height", pa.int32()),          # original image size (0 when it could not be decoded)
    ("width", pa.int32()),
    ("model", pa.string()),          # the model's digest (the table's partition column)
    ("error", pa.string()),          # null, or why the image could not be scored
    ("warning", pa.string()),        # null, or what went wrong without costing the score (no heatmap written)
    ("digest", pa.string()),         # sha256 of the image file
    ("size", pa.int64()),            # file size and modification time (seconds) when scored
    ("mtime", pa.float64()),
    ("ctime", pa.float64()),         # local files: status change time (seconds); null on S3
    ("etag", pa.string()),           # S3 objects: the ETag; null for local files
    ("decode_ms", pa.float32()),
    ("score_ms", pa.float32()),
    ("scored_at", pa.timestamp("s", tz="UTC")),
    ("run", pa.string()),            # the run that scored the row (its patch-score grid's key)
    ("product", pa.string()),        # score --models: the catalogue's product the image was routed to (null
                                     # for single-model runs and rows of tables written before it existed)
])
GRID_FIELDS = [("grid_h", pa.int32()), ("grid_w", pa.int32()), ("patch_scores", pa.list_(pa.float32()))]
GRID_SCHEMA = pa.schema([("image", pa.string()), ("model", pa.string()), ("run", pa.string()),
                         ("scored_at", pa.timestamp("s", tz="UTC"))] + GRID_FIELDS)
STAT_COLUMNS = ("size", "mtime", "ctime", "etag")   # what the incremental plan compares with the listing
PLAN_BATCH_ROWS = 16384          # rows per batch the plan reads: bounds its memory, whatever the table's size
COMPACT_FILES = 32               # a model's partition with more data files than this is compacted after a run
KILL_BEFORE_COMMIT = "PATCHCORE_TEST_KILL_BEFORE_COMMIT"   # fault injection: exit hard right before a commit
_MODEL = re.compile(r"^[0-9A-Za-z_-]+$")


def table_schema(patch_scores: bool) -> pa.Schema:
    """The schema :func:`read_scores` returns, with the patch-score grid columns when asked for them."""
    return pa.schema(list(SCORE_SCHEMA) + [pa.field(n, t) for n, t in GRID_FIELDS]) if patch_scores else SCORE_SCHEMA


def scores_uri(output: str) -> str:
    """The score table (all models) under ``output``."""
    return storage.join(output, "scores")


def grids_uri(output: str) -> str:
    """The patch-score grid table under ``output``."""
    return storage.join(output, "patch_scores")


def _stored(schema: pa.Schema) -> pa.Schema:
    """``schema`` as Delta stores it: timestamps in microseconds (Delta has no seconds type)."""
    return pa.schema([pa.field(f.name, pa.timestamp("us", tz="UTC") if pa.types.is_timestamp(f.type) else f.type)
                      for f in schema])


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table``'s columns in ``schema``'s order and types; columns it lacks are null."""
    cols = [table.column(f.name).cast(f.type, safe=False) if f.name in table.column_names
            else pa.nulls(table.num_rows, f.type) for f in schema]
    return pa.Table.from_arrays(cols, schema=schema)


def open_tables(output: str, opts: dict) -> int:
    """Make sure the score table exists with every column of SCORE_SCHEMA (columns added since a table
    was written are added to it); an output written by an earlier version (Parquet parts under
    scores/<model>/) is converted first, with every row it holds. A folder where a table belongs that
    holds files but is not a Delta table (a user's folder) is refused, never adopted as the table.
    Returns the number of parts converted (0 when there were none)."""
    uri = scores_uri(output)
    if delta.load(uri, opts) is not None:
        delta.add_missing_columns(uri, opts, _stored(SCORE_SCHEMA))
        return 0
    parts = legacy_scores.find_parts(uri, opts)
    for folder in (grids_uri(output),) if parts else (uri, grids_uri(output)):
        _refuse_foreign(folder, opts)
    if parts:
        _convert(output, parts, opts)
    delta.create(uri, opts, _stored(SCORE_SCHEMA), ["model"])
    return sum(len(uris) for uris in parts.values())


def _refuse_foreign(uri: str, opts: dict) -> None:
    """A StorageError when ``uri`` holds files but no Delta table (no log); nothing there, or a table, is fine."""
    if storage.holds_anything(uri, **opts) and delta.load(uri, opts) is None:
        raise StorageError(f"{uri} holds files but is not a Delta table (it has no _delta_log/): it is not this output's "
                           f"{posixpath.basename(uri.rstrip('/'))} table, and patchcore does not write its table "
                           "among other files. Move those files elsewhere, or choose another --output")


def _convert(output: str, parts: dict, opts: dict) -> None:
    """The newest row per image of every model's Parquet parts, as the score table's first version
    (so the table exists with all of them, or not at all); then the parts are deleted."""
    from deltalake import write_deltalake
    run = f"converted-{uuid.uuid4().hex[:8]}"
    rows, grids = legacy_scores.newest_rows(parts, opts)
    rows = _conform(rows, _stored(SCORE_SCHEMA))
    rows = rows.set_column(rows.schema.get_field_index("run"), "run", pa.array([run] * rows.num_rows, pa.string()))
    if grids is not None and grids.num_rows:
        grids = grids.append_column("run", pa.array([run] * grids.num_rows, pa.string()))
        _append(grids_uri(output), _conform(grids, _stored(GRID_SCHEMA)), opts)
    uri = scores_uri(output)
    table_uri, so = delta.location(uri, opts)
    try:
        write_deltalake(table_uri, rows, mode="error", partition_by=["model"],
                        configuration=delta.CONFIGURATION, storage_options=so)
    except Exception as e:
        if delta.load(uri, opts) is None:  # not another run converting the same parts at the same time
            raise StorageError(f"cannot convert the score parts under {uri}: {e}") from None
    log.info("converted %d score rows of %d models from Parquet parts into the Delta table %s",
             rows.num_rows, len(parts), uri)
    legacy_scores.delete_parts(parts, opts)


def _append(uri: str, table: pa.Table, opts: dict) -> None:
    """Append ``table`` to the (append-only) Delta table at ``uri``, created on the first append."""
    from deltalake import write_deltalake
    table_uri, so = delta.location(uri, opts)
    delta.retry_commits(lambda: write_deltalake(table_uri, table, mode="append", partition_by=["model"],
                                                configuration=delta.CONFIGURATION, storage_options=so),
                        f"appending {table.num_rows} rows to {uri}")


def _unique(rows: pa.Table) -> pa.Table:
    """The last row per image (a MERGE source must not match one target row twice)."""
    if len(pc.unique(rows.column("image"))) == rows.num_rows:
        return rows
    last = rows.append_column("__i", pa.array(np.arange(rows.num_rows))).group_by("image", use_threads=False) \
        .aggregate([("__i", "max")])
    return rows.take(np.sort(last.column("__i_max").to_numpy()))


def commit(output: str, model: str, rows: pa.Table, opts: dict, grids: pa.Table | None = None,
           since: int | None = None, run: str | None = None) -> dict:
    """Commit score rows of one model atomically: the grids (if any) are appended to their table,
    then one MERGE on (model, image) puts the rows into the score table, retried on a new version
    while concurrent commits overtake it.

    ``rows``: SCORE_SCHEMA columns plus ``unchanged`` (bool): a row for an image whose file was read
    again and found to have its previous digest, which only updates that row's file statistics.
    A scored row replaces a live row scored no later than itself; a new image is inserted. Optional
    ``first_time`` (bool): the image had no row of this model at table version ``since`` (the version
    the plan read); such rows are appended without a MERGE when that is safe (:func:`_append_new`),
    else they join the MERGE. ``run`` tags this run's commits (its own commits never count as
    concurrent). Returns delta-rs's merge metrics and ``appended`` (rows appended).
    """
    if not _MODEL.match(model):
        raise StorageError(f"not a model digest: {model!r}")
    uri = scores_uri(output)
    merge_schema = _stored(SCORE_SCHEMA).append(pa.field("unchanged", pa.bool_()))
    rows = _unique(rows)
    first = (pc.fill_null(rows.column("first_time"), False) if "first_time" in rows.column_names and since is not None
             else pa.array(np.zeros(rows.num_rows, bool)))
    new, old = rows.filter(first), rows.filter(pc.invert(first))
    if grids is not None and grids.num_rows:
        _append(grids_uri(output), _conform(grids, _stored(GRID_SCHEMA)), opts)
    if os.environ.get(KILL_BEFORE_COMMIT):
        log.warning("%s is set: exiting before the commit", KILL_BEFORE_COMMIT)
        os._exit(75)
    appended = 0
    if new.num_rows and _append_new(uri, opts, model, _conform(new, _stored(SCORE_SCHEMA)), since, run):
        appended = new.num_rows
    elif new.num_rows:
        old = pa.concat_tables([old, new])
    metrics = {}
    if old.num_rows:
        source = _conform(old, merge_schema)
        metrics = delta.retry_commits(lambda: _merge(uri, opts, model, source, run),
                                      f"committing {source.num_rows} score rows to {uri}")
    return {**metrics, "appended": appended}


APPEND_ATTEMPTS = 8        # appends tried while other commits take the next version (then: MERGE)
APPEND_MAX_VERSIONS = 1000  # more versions than this since the plan read the table: MERGE (no log walk)


def _append_new(uri: str, opts: dict, model: str, rows: pa.Table, since: int, run: str | None) -> bool:
    """Append the rows of images that had no row of this model at version ``since``, if no other
    commit since then added data to the model's partition (:func:`_partition_touched`); True when
    appended, False when the caller must MERGE them (which is always correct).

    Safe against concurrent runs: the append is committed on the exact version that was checked
    (``max_commit_retries=0``: when another commit takes that version first, delta-rs fails it and
    the new versions are checked again), so no version between the plan's read and the append
    inserted one of these images. It is recorded as not a blind append, so a concurrent MERGE that
    read the partition before it conflicts and runs again over it (delta-rs also conflicts a
    MERGE with a concurrent blind append into its partition; tested)."""
    from deltalake import CommitProperties, write_deltalake
    from deltalake.exceptions import CommitFailedError
    meta = {"isBlindAppend": False, **({"patchcore.run": run} if run else {})}
    for _ in range(APPEND_ATTEMPTS):
        dt = delta.load(uri, opts)
        if dt is None or _partition_touched(uri, opts, model, since, dt.version(), run):
            return False
        try:
            write_deltalake(dt, rows, mode="append", partition_by=["model"],
                            commit_properties=CommitProperties(max_commit_retries=0, custom_metadata=meta))
            return True
        except CommitFailedError:
            continue
        except Exception as e:  # e.g. a table whose columns are in another order: the MERGE handles it
            log.debug("append of %d new rows to %s not possible (%s): merged instead", rows.num_rows, uri, e)
            return False
    return False


def _partition_touched(uri: str, opts: dict, model: str, since: int, until: int, run: str | None) -> bool:
    """Whether a commit after version ``since`` up to ``until``, other than this run's own, added data
    files to the model's partition (read from the table's log entries; a missing entry counts)."""
    import json
    if until - since > APPEND_MAX_VERSIONS:
        return True
    for version in range(since + 1, until + 1):
        try:
            lines = storage.read_bytes(storage.join(uri, "_delta_log", f"{version:020d}.json"), **opts).splitlines()
        except (FileNotFoundError, StorageError):
            return True
        actions = [json.loads(line) for line in lines if line.strip()]
        if run and any(a.get("commitInfo", {}).get("patchcore.run") == run for a in actions):
            continue
        if any(a["add"].get("dataChange", True) and (a["add"].get("partitionValues") or {}).get("model") == model
               for a in actions if "add" in a):
            return True
    return False


def _merge(uri: str, opts: dict, model: str, source: pa.Table, run: str | None = None) -> dict:
    from deltalake import CommitProperties
    from deltalake.exceptions import CommitFailedError
    dt = delta.load(uri, opts) or delta.create(uri, opts, _stored(SCORE_SCHEMA), ["model"])
    stats = {c: f"s.{c}" for c in STAT_COLUMNS}
    tag = CommitProperties(custom_metadata={"patchcore.run": run}) if run else None
    try:
        return (dt.merge(source, predicate=f"t.model = '{model}' AND t.model = s.model AND t.image = s.image",
                         source_alias="s", target_alias="t", streamed_exec=False, commit_properties=tag)
                .when_matched_update(stats, predicate="s.unchanged AND t.digest = s.digest")
                .when_matched_update_all(predicate="NOT s.unchanged AND s.scored_at >= t.scored_at",
                                         except_cols=["unchanged"])
                .when_not_matched_insert_all(predicate="NOT s.unchanged", except_cols=["unchanged"])
                .execute())
    except CommitFailedError:
        raise
    except Exception as e:  # a data file of the partition that cannot be read, or the storage itself
        raise delta.unreadable(dt.to_pyarrow_dataset(file_pruning_predicate=[("model", "=", model)]), uri, e) from None


@dataclass
class Previous:
    """What the plan learns from the table (:func:`previous_rows`), per listed file."""
    unchanged: np.ndarray       # a successful row with the same size, mtime, ctime and ETag: not read
    known: pa.Array             # the digest of the successful row where the file changed (null: none)
    exists: np.ndarray          # any row of this model (successful or an error row)
    version: int | None         # the table version read (None: no table)


def previous(output: str, model: str, listing: pa.Table, opts: dict) -> tuple[np.ndarray, pa.Array]:
    """:func:`previous_rows`' unchanged files and known digests."""
    p = previous_rows(output, model, listing, opts)
    return p.unchanged, p.known


def previous_rows(output: str, model: str, listing: pa.Table, opts: dict, verify: np.ndarray | None = None) -> Previous:
    """What this model's live rows say about the listed files (``listing``: uri, size, mtime, ctime,
    etag; sorted by uri): per file, whether its successful row has the same size, mtime, ctime and
    ETag (nulls equal), i.e. it need not be read; the successful row's digest where the file changed
    (null elsewhere: no previous result); whether it has any row; and the version read. ``verify``
    (bool per file): files whose equal statistics prove nothing (a manifest's S3 entry without an
    ETag): never unchanged, read and compared with the row's digest.

    Reads the partition's image, file-statistic, digest and error columns in batches of
    PLAN_BATCH_ROWS and matches each batch against the listing by binary search: memory is the
    listing plus two bytes per file plus one batch, whatever the table's size.
    """
    n = listing.num_rows
    unchanged, exists = np.zeros(n, bool), np.zeros(n, bool)
    dt = delta.load(scores_uri(output), opts)
    if dt is None or n == 0:
        return Previous(unchanged, pa.nulls(n, pa.string()), exists, dt and dt.version())
    uri = listing.column("uri")  # as it is: combining chunks would copy it
    if not storage.is_sorted(uri, strict=True):
        if not storage.is_sorted(uri):
            raise ValueError("internal error: the listing must be sorted by uri")
        return _with_duplicates(output, model, listing, opts, verify)
    file_schema = pa.schema([f for f in _stored(SCORE_SCHEMA) if f.name != "model"])
    ds = delta.dataset(dt, scores_uri(output), opts, file_schema, where=[("model", "=", model)])
    known_idx, known_digest = [np.zeros(0, np.int64)], [pa.array([], pa.string())]
    try:
        for batch in ds.to_batches(columns=["image", *STAT_COLUMNS, "digest", "error"], batch_size=PLAN_BATCH_ROWS,
                                   batch_readahead=0, fragment_readahead=0, use_threads=False):
            bi, li, same = _match(uri, listing, batch)
            exists[li] = True
            ok = batch.column("error").is_null().to_numpy(zero_copy_only=False)[bi]
            bi, li, same = bi[ok], li[ok], same[ok]
            if verify is not None:
                same &= ~verify[li]
            unchanged[li[same]] = True
            known_idx.append(li[~same])
            known_digest.append(batch.column("digest").take(bi[~same]))
    except (OSError, pa.ArrowException) as e:
        raise delta.unreadable(ds, scores_uri(output), e) from None
    where = np.full(n, -1, np.int64)
    where[np.concatenate(known_idx)] = np.arange(sum(len(i) for i in known_idx))
    return Previous(unchanged, pa.concat_arrays(known_digest).take(pa.array(where, mask=where < 0)), exists,
                    dt.version())


def _with_duplicates(output: str, model: str, listing: pa.Table, opts: dict, verify: np.ndarray | None) -> Previous:
    """:func:`previous_rows` for a listing that holds a URI more than once (no listing of ours does):
    the plan of its distinct URIs, each copy given its first copy's answer (its rows commit as one row)."""
    uri = listing.column("uri")
    start = np.r_[True, pc.not_equal(uri[1:], uri[:-1]).to_numpy(zero_copy_only=False)]
    first = np.flatnonzero(start)
    log.warning("the listing holds %d URI(s) more than once; each is planned (and committed) once",
                listing.num_rows - len(first))
    p = previous_rows(output, model, listing.take(first), opts, None if verify is None else verify[first])
    copy_of = np.cumsum(start) - 1  # the position of each row's first copy among the distinct URIs
    return Previous(p.unchanged[copy_of], p.known.take(pa.array(copy_of)), p.exists[copy_of], p.version)


def _match(uri: pa.ChunkedArray, listing: pa.Table, batch: pa.RecordBatch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For the batch rows whose image is listed: (their index in the batch, in the listing, whether
    the file statistics are the same)."""
    img = batch.column("image")
    pos = np.minimum(pc.search_sorted(uri, img).to_numpy(zero_copy_only=False), len(uri) - 1).astype(np.int64)
    hit = pc.fill_null(pc.equal(uri.take(pos), img), False).to_numpy(zero_copy_only=False)
    bi = np.flatnonzero(hit)
    li = pos[bi]
    same = np.ones(len(bi), bool)
    for c in STAT_COLUMNS:
        a, b = listing.column(c).take(li), batch.column(c).take(bi)
        same &= (pc.fill_null(pc.equal(a, b), False).to_numpy(zero_copy_only=False)
                 | (a.is_null().to_numpy(zero_copy_only=False) & b.is_null().to_numpy(zero_copy_only=False)))
    return bi, li, same


def read_scores(output: str, opts: dict | None = None, model: str | None = None, patch_scores: bool = False,
                version: int | str | None = None, where: pc.Expression | None = None) -> pa.Table:
    """The score table under ``output`` (all models, or one model's digest): one row per image and
    model, in SCORE_SCHEMA; with ``patch_scores`` also GRID_FIELDS, the grid each row was scored
    with (null where none was kept). ``version``: an earlier version of the table (its number, or an
    ISO 8601 time: time travel); ``where``: a pyarrow filter expression on the table's columns."""
    opts = opts or {}
    uri = scores_uri(output)
    dt = delta.load(uri, opts, version)
    if dt is None:
        if legacy_scores.find_parts(uri, opts):
            raise StorageError(f"{uri} holds score parts written by an earlier version of patchcore-dist: convert them "
                               f"into the Delta table with `patchcore maintain --output {output}` (the next score run "
                               "converts them too)")
        return table_schema(patch_scores).empty_table()
    ds = dt.to_pyarrow_dataset(file_pruning_predicate=[("model", "=", model)] if model else None)
    flt = (pc.field("model") == model) if model else None
    if where is not None:
        flt = where if flt is None else flt & where
    table = _conform(delta.read(ds, uri, filter=flt), SCORE_SCHEMA)
    return _with_grids(output, opts, table, model) if patch_scores else table


def top_rows(output: str, opts: dict, model: str, columns: list[str],
             selections: list[tuple[pc.Expression, list[tuple[str, str]], int]]) -> list[tuple[pa.Table, int]]:
    """Per selection (a filter, pyarrow sort keys, ``k``): the first ``k`` of one model's rows matching
    the filter in the order of the sort keys, with those of ``columns`` the table has (the filters'
    columns among them), and how many rows match. One pass over the model's partition in batches of
    PLAN_BATCH_ROWS, keeping the best ``k`` of each selection: memory is those rows plus one batch of
    ``columns``, whatever the table's size."""
    uri = scores_uri(output)
    dt = delta.load(uri, opts)
    schema = _stored(SCORE_SCHEMA) if dt is None else dt.to_pyarrow_dataset(
        file_pruning_predicate=[("model", "=", model)]).schema
    cols = [c for c in columns if c in schema.names]
    tops = [pa.schema([schema.field(c) for c in cols]).empty_table() for _ in selections]
    counts = [0] * len(selections)
    if dt is None:
        return list(zip(tops, counts))
    ds = dt.to_pyarrow_dataset(file_pruning_predicate=[("model", "=", model)])
    wanted = functools.reduce(operator.or_, [where for where, _, _ in selections])
    try:
        for batch in ds.to_batches(columns=cols, filter=(pc.field("model") == model) & wanted,
                                   batch_size=PLAN_BATCH_ROWS, batch_readahead=0, fragment_readahead=0):
            rows = pa.Table.from_batches([batch], schema=tops[0].schema)
            for i, (where, keys, k) in enumerate(selections):
                match = rows.filter(where)
                counts[i] += match.num_rows
                both = pa.concat_tables([tops[i], match])
                tops[i] = both.take(pc.select_k_unstable(both, k, sort_keys=keys)) if both.num_rows > k else both
    except (OSError, pa.ArrowException) as e:
        raise delta.unreadable(ds, uri, e, cols) from None
    return [(t.take(pc.sort_indices(t, sort_keys=keys)), n) for t, (_, keys, _), n in zip(tops, selections, counts)]


def _with_grids(output: str, opts: dict, table: pa.Table, model: str | None) -> pa.Table:
    """``table`` with the grid columns of its rows' (image, model, run), null where there is none."""
    uri = grids_uri(output)
    dt = delta.load(uri, opts)
    if dt is None:
        return _conform(table, table_schema(True))
    ds = dt.to_pyarrow_dataset(file_pruning_predicate=[("model", "=", model)] if model else None)
    keys = ["image", "model", "run"]
    grids = delta.read(ds, uri, filter=pc.field("image").isin(pc.unique(table.column("image"))))
    left = table.select(keys).append_column("__row", pa.array(np.arange(table.num_rows)))
    right = grids.select(keys).append_column("__grid", pa.array(np.arange(grids.num_rows)))
    pairs = left.join(right, keys=keys, join_type="inner", use_threads=False)
    where = np.full(table.num_rows, -1, np.int64)
    where[pairs.column("__row").to_numpy()] = pairs.column("__grid").to_numpy()
    take = pa.array(where, mask=where < 0)
    for name, typ in GRID_FIELDS:
        table = table.append_column(pa.field(name, typ), grids.column(name).cast(typ).take(take))
    return table


def compact_if_due(output: str, model: str, opts: dict) -> None:
    """OPTIMIZE this model's partition of each table once it holds more than COMPACT_FILES data
    files (each commit adds at least one): scheduled runs do not grow a mass of small files."""
    for uri in (scores_uri(output), grids_uri(output)):
        dt = delta.load(uri, opts)
        if dt is not None and len(dt.file_uris(file_pruning_predicate=[("model", "=", model)])) > COMPACT_FILES:
            delta.compact(dt, uri, [("model", "=", model)])


def maintain(output: str, opts: dict, vacuum_hours: float | None = None, repair: bool = False) -> dict:
    """Table maintenance (``patchcore maintain``): convert an earlier version's Parquet parts,
    optionally drop references to missing data files (``repair``), drop patch-score grids that no
    live row uses and that are older than the retention, compact every partition, write a log
    checkpoint, and with ``vacuum_hours`` (a positive number of hours, rounded up to whole hours)
    delete the tables' own data files that no version newer than that needs. An output without a
    score table is refused: maintenance never creates one."""
    if vacuum_hours is not None:
        delta.retention(vacuum_hours)
    _require_table(output, opts)
    converted = open_tables(output, opts)
    done = {}
    for uri in (scores_uri(output), grids_uri(output)):
        dt = delta.load(uri, opts)
        if dt is None:
            continue
        step = {"version": dt.version()}
        if uri == scores_uri(output):
            step["converted"] = converted
        if repair:
            step["repaired"] = dt.repair(dry_run=False)["files_removed"]
            dt = delta.load(uri, opts)
        if uri == grids_uri(output):
            step["grids_dropped"] = _drop_unused_grids(output, opts, 168.0 if vacuum_hours is None else vacuum_hours)
            dt = delta.load(uri, opts)
        metrics = delta.compact(dt, uri)
        step["compacted"] = metrics and {k: metrics[k] for k in ("numFilesRemoved", "numFilesAdded", "partitionsOptimized")}
        dt = delta.load(uri, opts)
        dt.create_checkpoint()
        dt.cleanup_metadata()
        if vacuum_hours is not None:
            step["vacuumed"] = delta.vacuum(dt, uri, opts, vacuum_hours)
        done[uri] = step
    # the command prints it as sentences (cli.printing.maintain_lines); the raw counts at DEBUG
    log.debug("maintenance of %s: %s", output, {u: {k: (len(v) if isinstance(v, list) else v) for k, v in s.items()}
                                                for u, s in done.items()})
    return done


def _require_table(output: str, opts: dict) -> None:
    """A StorageError unless ``output`` holds a score table or an earlier version's score parts."""
    uri = scores_uri(output)
    if delta.load(uri, opts) is not None or legacy_scores.find_parts(uri, opts):
        return
    for folder in (uri, grids_uri(output)):
        _refuse_foreign(folder, opts)
    raise StorageError(f"no score table under {output} (no {uri}/_delta_log): nothing to maintain. Check --output: "
                       "it is the --output of a score or evaluate run")


def _drop_unused_grids(output: str, opts: dict, older_than_hours: float) -> int:
    """Delete the grids that no live score row refers to (superseded by a later run, or left by a
    run that never committed its rows) and that were written more than ``older_than_hours`` ago
    (a running job's grids are appended before its rows are committed)."""
    live = delta.load(scores_uri(output), opts)
    grids = delta.load(grids_uri(output), opts)
    if live is None or grids is None:
        return 0
    cutoff = (_dt.datetime.now(_dt.timezone.utc) - _dt.timedelta(hours=older_than_hours)).strftime("%Y-%m-%dT%H:%M:%SZ")
    keys = delta.read(live.to_pyarrow_dataset(), scores_uri(output), columns=["image", "model", "run"])

    def attempt():
        dt = delta.load(grids_uri(output), opts)
        return (dt.merge(keys, predicate="t.model = s.model AND t.image = s.image AND t.run = s.run",
                         source_alias="s", target_alias="t")
                .when_not_matched_by_source_delete(predicate=f"t.scored_at < '{cutoff}'").execute())
    return delta.retry_commits(attempt, f"dropping unused grids of {grids_uri(output)}")["num_target_rows_deleted"]
