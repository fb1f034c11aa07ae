"""Deterministic fault injection for the fault tests: the worker process running a stage's N-th batch
of the job exits hard, once.

``PATCHCORE_FAULT="<stage>:<n>:<marker file>[:raise|:stop][;...]"`` in the driver's
environment (stages: ``decode``, ``extract``, ``score``, ``render``). The driver reads it when it
builds the pipeline and hands it to the stages as an argument, so workers that were started before
the variable was set see it too. The process running the job's N-th batch of that stage (counted
across processes in ``<marker>.count``) creates the marker file with create-if-absent semantics
(``O_EXCL``) and, if it was the one to create it, calls
``os._exit`` like a killed process (no cleanup, no exception for Ray to catch). The marker makes the
fault happen once per job even though Ray restarts the actor or retries the task in a fresh process,
and tells the test that the fault did happen. With ``:raise`` the batch raises :class:`InjectedFault`
instead (an error inside the stage, which turns the batch's rows into error rows). With ``:stop`` the
process stops itself (SIGSTOP) after creating the marker: a process frozen at a known point of the
job, for tests that kill the driver there (a timed kill could land after the job ended). Faults that
raise or stop can run in the job's own process (:func:`exits`). Unset (always, outside tests) it does
nothing.
"""
from __future__ import annotations

import logging
import os
import signal

from ..errors import InjectedFault, JobError

log = logging.getLogger(__name__)

FAULT_ENV = "PATCHCORE_FAULT"
STAGES = ("decode", "extract", "score", "render")
MODES = ("raise", "stop")  # without one: exit
EXIT_CODE = 70


def from_env() -> tuple[tuple[str, int, str], ...]:
    """The faults asked for in the driver's environment, checked: ((stage, n, marker), ...)."""
    raw = os.environ.get(FAULT_ENV, "").strip()
    out = []
    for spec in filter(None, (s.strip() for s in raw.split(";"))):
        stage, _, rest = spec.partition(":")
        n, _, marker = rest.partition(":")
        path, mode = _mode(marker)
        if stage not in STAGES or not n.isdigit() or int(n) < 1 or not path:
            raise JobError(f"{FAULT_ENV}: {spec!r} is not <stage>:<batch number>:<marker file>[:raise|:stop] "
                           f"with a stage of {', '.join(STAGES)}")
        out.append((stage, int(n), marker))
    if out:
        log.warning("fault injection on (%s): %s", FAULT_ENV, raw)
    return tuple(out)


def _mode(marker: str) -> tuple[str, str]:
    """The marker's path and the fault's mode (``exit``, or one of :data:`MODES`)."""
    path, _, mode = marker.rpartition(":")
    return (path, mode) if mode in MODES else (marker, "exit")


def exits(faults) -> bool:
    """Whether one of the faults exits the process it runs in (then never the job's own)."""
    return any(_mode(marker)[1] == "exit" for _, _, marker in faults or ())


def on_batch(faults, stage: str) -> None:
    """Count a batch of ``stage`` for this job; exit hard (or raise) if it is a fault's N-th and the
    fault is not yet taken.

    The count is the job's, not the process's: each batch appends one byte to ``<marker>.count``
    (O_APPEND: the kernel places each append after the others, so the offset after it is this batch's
    number among all the job's processes). Ray decides which worker process runs which task, so a
    per-process count could never reach N when the batches spread over many workers.
    """
    for name, n, marker in faults or ():
        path, mode = _mode(marker)
        if name != stage or os.path.exists(path):
            continue
        fd = os.open(path + ".count", os.O_CREAT | os.O_APPEND | os.O_WRONLY, 0o644)
        try:
            os.write(fd, b".")
            number = os.lseek(fd, 0, os.SEEK_CUR)
        finally:
            os.close(fd)
        if number != n:
            continue
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            continue  # taken by an earlier process of this job
        if mode == "raise":
            raise InjectedFault(f"injected fault in {stage} batch {n}")
        if mode == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
            continue
        os._exit(EXIT_CODE)
