"""The run record: one JSON object per fit or score run under ``<output>/runs/``.

    <output>/runs/<started, UTC, to the microsecond>-<random>.json   (the run id)

One object per run, written once when the run ends (no appends, so concurrent runs and object
storage need no coordination); :func:`read_runs` lists them oldest first. For a fit, ``<output>``
is the model directory.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import numbers
import re
import uuid

from . import storage

log = logging.getLogger(__name__)

RUNS = "runs"


def new_run_id() -> tuple[str, str]:
    """(run id, start time as ISO-8601 UTC)."""
    now = _dt.datetime.now(_dt.timezone.utc)  # microseconds: runs started in the same second still sort
    return now.strftime("%Y%m%dT%H%M%S%fZ") + "-" + uuid.uuid4().hex[:8], now.isoformat(timespec="milliseconds")


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def error_reasons(errors: list[str]) -> dict[str, int]:
    """Error messages counted by reason: the message up to its first colon, numbers replaced by N
    (so "image is 8x8, smaller than image.min_side=16" and "... 9x9 ..." count as one reason)."""
    out: dict[str, int] = {}
    for e in errors:
        reason = re.sub(r"\d+", "N", e.split(":", 1)[0])[:160]
        out[reason] = out.get(reason, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def write_run(output: str, record: dict, opts: dict) -> str:
    """Write one run's record (it must hold ``run_id``); returns its URI."""
    uri = storage.join(output, RUNS, f"{record['run_id']}.json")
    storage.write_bytes(uri, json.dumps(record, indent=1, sort_keys=True, default=str).encode(), **opts)
    return uri


def read_runs(output: str, opts: dict) -> list[dict]:
    """Every run record under ``output``, oldest first; a record that cannot be read stays in the list as
    its run id with the reason in ``error`` (one bad file never hides the others); one that reads but
    is not a run record (see :func:`malformed`) is skipped with a warning naming its file."""
    try:
        files = storage.list_files(storage.join(output, RUNS), (".json",), **opts)
    except FileNotFoundError:
        return []
    out = []
    for uri, rel in files:
        try:
            record = json.loads(storage.read_bytes(uri, **opts))
        except (ValueError, OSError) as e:
            out.append({"run_id": rel.removesuffix(".json"), "error": f"unreadable record: {e}"})
            continue
        problem = malformed(record)
        if problem:
            log.warning("skipped the malformed run record %r: %s", uri, problem)
        else:
            out.append(record)
    return sorted(out, key=lambda r: r["run_id"])


_TEXT = ("run_id", "job", "started")  # what every record has, as text


def malformed(record) -> str | None:
    """What is wrong with a run record for reading and printing it, or None: an object with the keys
    of :data:`_TEXT` as text, and the summaries the listing prints (errors by reason, score
    quantiles, anomaly rate, drift) of their own shapes where present."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    for key in _TEXT:
        if not isinstance(record.get(key), str):
            return f"{key!r} is missing or not text"
    if not _number(record.get("anomaly_rate"), none=True):
        return "'anomaly_rate' is not a number"
    reasons = record.get("errors_by_reason") or {}
    if not isinstance(reasons, dict) or not all(_number(n) for n in reasons.values()):
        return "'errors_by_reason' is not an object of counts"
    quantiles = record.get("score_quantiles") or {}
    if not isinstance(quantiles, dict) or (quantiles and not _number(quantiles.get("p99"))):
        return "'score_quantiles' is not an object with a number p99"
    drift = record.get("drift") or {}
    if not isinstance(drift, dict) or (drift.get("warning") and not _number(drift.get("share_above"))):
        return "'drift' is not an object with a number share_above"
    if not isinstance(record.get("error", ""), str):
        return "'error' is not text"
    return None


def _number(value, none: bool = False) -> bool:
    return (none and value is None) or (isinstance(value, numbers.Real) and not isinstance(value, bool))


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def printable(value):
    """``value`` (a record, or anything in one) with every control character of its text escaped
    (``\\x1b``, ``\\n``, ``\\u202e``...), keys too: what a terminal shows of a record is what it holds,
    never a forged line, a cursor movement or a reordered text."""
    if isinstance(value, str):
        return _CONTROL.sub(_escape, value)
    if isinstance(value, dict):
        return {printable(k): printable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [printable(v) for v in value]
    return value


def _escape(m: re.Match) -> str:
    c = m.group()
    named = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
    return named.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")
