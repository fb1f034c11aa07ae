"""What makes a model folder one fit's: the fit lease, and the marker that says which files a fit may remove.

    <model>/.fit-lease      held while a fit runs: a random token, host name, boot id, pid, the pid's
                            start time and PID namespace of the fit's driver
    <model>/.patchcore-fit  written by a fit before any model file, removed once the model is committed:
                            the folder's other files are an (interrupted) fit's, which a later fit removes

Guarantees:

* Taking the lease is a create-if-absent (:func:`storage.create_exclusive`): local ``link`` (or
  ``O_EXCL``), S3 ``If-None-Match: *``. Of concurrent fits exactly one gets it.
* A lease is taken over only on proof that its holder is dead: the same boot id and the same PID
  namespace as this fit's, and its pid not running (or a zombie, or running with another start time:
  the pid was reused). A lease from another machine, boot or container is refused, with the holder's
  details and what to do; so is one this system cannot judge (no ``/proc``).
* The take-over is a compare-and-swap on the stale lease as read (:func:`storage.replace_if_tag`):
  S3 ``PUT`` with ``If-Match: <ETag>``; locally a claim created with ``O_EXCL`` per stale content, then
  an atomic replace (the lease path never goes missing). Of simultaneous take-overs exactly one wins.
* Release deletes the lease only while it holds this fit's token: read, compare, then a conditional
  delete on what was read (:func:`storage.delete_if_tag`: S3 ``DELETE`` with ``If-Match``; locally under
  the claim). On a store without conditional deletes it is read-compare-delete, whose gap matters only
  if the lease is replaced in between, which a take-over does not do while this fit lives.
* A fit removes files only in a folder carrying the marker; any other folder holding files is refused
  with their names (a user's ``config.yaml`` in ``--model`` survives).
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import socket
import uuid
from dataclasses import dataclass

from .. import __version__
from ..errors import JobError, StorageError
from . import storage
from .model import MANIFEST, MODEL_FILES

log = logging.getLogger(__name__)

LEASE = ".fit-lease"
MARKER = ".patchcore-fit"
_TRIES = 3


@dataclass(frozen=True)
class FitLease:
    uri: str
    model: str
    body: bytes   # the lease as written
    token: str


def holder_identity() -> dict:
    """This process as a lease records it."""
    pid = os.getpid()
    return {"token": uuid.uuid4().hex, "host": socket.gethostname(), "boot_id": _boot_id(), "pid": pid,
            "pid_start": _start_time(pid), "pid_ns": _pid_namespace(),
            "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat from field 3 (the state) on, or None when it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()  # the name (field 2) may hold spaces and parentheses


def _start_time(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None  # field 22: start time, clock ticks after boot


def _is_pid(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _process_gone(pid: int, start: int) -> bool:
    """True only when process ``pid`` that started at ``start`` provably no longer runs (this namespace)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # it exists, another user's
    fields = _stat_fields(pid)
    if fields is None:
        return False  # it exists but /proc hides it (hidepid), or it just ended: cannot tell
    return fields[0] in ("Z", "X") or int(fields[19]) != start  # exited (not yet reaped), or the pid reused


def why_not_dead(held: dict) -> str | None:
    """None when the holder of the lease ``held`` is proven dead; else why it cannot be taken over."""
    if not (held.get("token") and _is_pid(held.get("pid")) and _is_pid(held.get("pid_start"))):
        return "the lease does not say which process holds it (unreadable, or written by an older version)"
    boot, ns = _boot_id(), _pid_namespace()
    if not (boot and ns):
        return "this system does not show boot ids and PID namespaces (/proc), so it cannot tell whether that fit runs"
    if held.get("boot_id") != boot:
        return ("it was taken on another machine or before this machine restarted (another boot id), where this "
                "fit cannot tell whether that fit runs")
    if held.get("pid_ns") != ns:
        return ("it was taken in another PID namespace (another container on this machine), where this fit cannot "
                "tell whether that fit runs")
    if not _process_gone(held["pid"], held["pid_start"]):
        return "its process is running"
    return None


def read_lease(uri: str, opts: dict) -> tuple[dict, str]:
    """(the lease as a dict, {} if unreadable; its tag for :func:`take_over`); FileNotFoundError if none."""
    data, tag = storage.read_tagged(uri, **opts)
    try:
        held = json.loads(data)
    except ValueError:
        held = {}
    return held if isinstance(held, dict) else {}, tag


def take_over(uri: str, tag: str, body: bytes, opts: dict) -> bool:
    """Replace the stale lease read with ``tag`` by ours; False when it is no longer that lease."""
    return storage.replace_if_tag(uri, tag, body, **opts)


def _refusal(model: str, uri: str, held: dict, why: str) -> JobError:
    return JobError(f"a fit into {model} is running or cannot be proven dead (lease {uri}: host {held.get('host')}, "
                    f"pid {held.get('pid')}, PID namespace {held.get('pid_ns')}, boot id {held.get('boot_id')}, since "
                    f"{held.get('started')}): {why}. Wait for that fit to finish; if no fit into {model} is running "
                    f"(one was killed), delete {uri} and run again")


def acquire_fit_lease(model: str, opts: dict) -> FitLease:
    """Take the model folder's fit lease before the fit touches the folder (see the module's guarantees);
    a JobError while another fit holds it or its holder cannot be proven dead."""
    uri = storage.join(model, LEASE)
    me = holder_identity()
    body = json.dumps(me).encode()
    held = {}
    for _ in range(_TRIES):
        try:
            storage.create_exclusive(uri, body, **opts)
            return FitLease(uri, model, body, me["token"])
        except FileExistsError:
            pass
        try:
            held, tag = read_lease(uri, opts)
        except FileNotFoundError:
            continue  # released meanwhile: create ours
        why = why_not_dead(held)
        if why:
            raise _refusal(model, uri, held, why)
        if take_over(uri, tag, body, opts):
            log.warning("took over the lease of a killed fit (host %s, pid %s, since %s)", held.get("host"),
                        held.get("pid"), held.get("started"))
            return FitLease(uri, model, body, me["token"])
    raise _refusal(model, uri, held, f"its lease could not be taken over (another fit took it over at the same "
                                     f"moment, or one was killed while taking it over: then also delete "
                                     f"{LEASE}.cas-* next to it)")


def release_fit_lease(lease: FitLease, opts: dict) -> None:
    """Remove the marker once the model is committed, then the lease, only while it holds our token.
    Never raises (it runs in a ``finally``: the fit's own error is the one to see); a lease it cannot
    remove is logged with what to do."""
    try:
        if storage.exists(storage.join(lease.model, MANIFEST), **opts):
            storage.delete(storage.join(lease.model, MARKER), **opts)
        held, tag = read_lease(lease.uri, opts)
        if held.get("token") != lease.token:
            log.warning("the lease %s is not this fit's any more (host %s, pid %s): left as it is", lease.uri,
                        held.get("host"), held.get("pid"))
        elif not storage.delete_if_tag(lease.uri, tag, **opts):
            log.warning("the lease %s changed while it was released: left as it is", lease.uri)
    except FileNotFoundError:
        log.warning("the lease %s was gone before the fit released it (deleted by hand?)", lease.uri)
    except StorageError as e:
        log.warning("could not release the lease %s (%s): delete it once no fit into %s runs", lease.uri, e,
                    lease.model)


def _model_file(rel: str) -> bool:
    """A name a fit writes (but the manifest): model files and feature shards."""
    top, _, rest = rel.partition("/")
    return rel in MODEL_FILES or (top in ("features", "validation") and rest.endswith(".parquet") and "/" not in rest)


def _names(rels: list[str], n: int = 5) -> str:
    shown = ", ".join(rels[:n])
    return shown + (f" and {len(rels) - n} more" if len(rels) > n else "")


def clean_uncommitted(model: str, opts: dict) -> None:
    """Make ``model`` this fit's before anything is written: a new or empty folder (but the lease) is
    marked; a marked one without manifest is an interrupted fit's, whose model files are removed; any
    other folder that holds files is refused with their names: nothing a fit did not write is removed."""
    try:
        found = storage.list_files(model, None, **opts)
    except FileNotFoundError:
        found = []
    claims = [u for u, r in found if r.startswith(LEASE + ".") and storage.CLAIM.match(r)]
    rest = [(u, r) for u, r in found if r not in (LEASE, MARKER) and u not in claims]
    if rest and not any(r == MARKER for _, r in found):
        raise JobError(f"{model} holds files no fit wrote ({_names([r for _, r in rest])}); a fit writes only "
                       f"into a new or empty folder, or one an interrupted fit left (it carries {MARKER}). Choose "
                       "another --model (a new folder), or move these files away; nothing was changed")
    foreign = [r for _, r in rest if not _model_file(r)]
    if foreign:
        raise JobError(f"{model} is an interrupted fit's folder but also holds other files ({_names(foreign)}): "
                       "move them away, or write the model to a new, empty URI")
    if rest:
        log.warning("%s holds %d files of an interrupted fit (no manifest): removing them", model, len(rest))
    for uri in [u for u, _ in rest] + claims:  # claims: of a take-over killed half-way (we hold the lease)
        storage.delete(uri, **opts)
    note = {"what": "a patchcore-dist fit writes this folder; without manifest.json it is an interrupted fit's, "
                    "whose files the next fit into it removes", "version": __version__,
            "host": socket.gethostname(), "pid": os.getpid(),
            "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    storage.write_bytes(storage.join(model, MARKER), json.dumps(note, indent=2).encode(), **opts)
