"""The run record: one JSON object per fit or score run under ``<output>/runs/``.

    <output>/runs/<started, UTC, to the microsecond>-<random>.json   (the run id)

One object per run, written once when the run ends (no appends, so concurrent runs and object
storage need no coordination); :func:`read_runs` lists them oldest first. For a fit, ``<output>``
is the model directory.
"""
from __future__ import annotations

import datetime as _dt
import json
import re
import uuid

from . import storage

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
    its run id with the reason in ``error`` (one bad file never hides the others)."""
    try:
        files = storage.list_files(storage.join(output, RUNS), (".json",), **opts)
    except FileNotFoundError:
        return []
    out = []
    for uri, rel in files:
        try:
            out.append(json.loads(storage.read_bytes(uri, **opts)))
        except (ValueError, OSError) as e:
            out.append({"run_id": rel.removesuffix(".json"), "error": f"unreadable record: {e}"})
    return sorted(out, key=lambda r: r.get("run_id", ""))
