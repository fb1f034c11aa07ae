"""The stages in this process, without Ray: the in-process executor of small local jobs.

The same stage callables as on Ray (:mod:`.stages`) over the same dict-of-numpy batches, in order.
Batches run on a few threads, each with one actor's thread settings (torch, faiss, BLAS), so that every
batch is computed with the same arithmetic as on a Ray actor: the model and the scores are bit for bit
those of a Ray run with the same config (a backbone's float rounding depends on its thread count). The
driver's own thread settings are restored afterwards (the coreset runs with them, as after a Ray run).
"""
from __future__ import annotations

import collections
import contextlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..config import Config

log = logging.getLogger(__name__)


def stage_threads(config: Config) -> int:
    """Threads per actor (torch, faiss, BLAS): runtime.torch_threads, else runtime.actor_cpus."""
    return config.runtime.torch_threads or max(1, int(round(config.runtime.actor_cpus)))


def workers(config: Config) -> int:
    """Batches in flight at once: as many as the machine's cores hold CPU actors (at least one); one on a
    GPU (one GPU actor)."""
    from ..core.devices import pick_device
    if pick_device(config.runtime.device).type == "cuda":
        return 1
    return max(1, (os.cpu_count() or 1) // stage_threads(config))


@contextlib.contextmanager
def driver_threads_kept():
    """Restore this process's torch, faiss and BLAS thread settings on exit (the stages set their own)."""
    import faiss
    import torch
    from threadpoolctl import threadpool_limits
    torch_threads, omp = torch.get_num_threads(), faiss.omp_get_max_threads()
    with threadpool_limits(limits=None):  # records the BLAS limits, restores them on exit
        try:
            yield
        finally:
            torch.set_num_threads(torch_threads)
            faiss.omp_set_num_threads(omp)


def in_batches(columns: dict, batch_size: int):
    """Dict-of-numpy batches of ``batch_size`` consecutive rows of equal-length numpy columns (the
    batches Ray Data's ``map_batches`` forms with the order preserved)."""
    n = len(next(iter(columns.values()))) if columns else 0
    for start in range(0, n, batch_size):
        yield {k: v[start:start + batch_size] for k, v in columns.items()}


def object_columns(items: list[dict], keys) -> dict:
    return {k: np.array([it[k] for it in items], object) for k in keys}


def map_ordered(fn, batches, config: Config):
    """``fn`` over ``batches``, in order, on :func:`workers` threads with the actors' thread settings;
    at most two batches per thread in flight (memory stays bounded)."""
    n = stage_threads(config)

    def init():
        import faiss
        import torch
        torch.set_num_threads(n)
        faiss.omp_set_num_threads(n)
    k = workers(config)
    with ThreadPoolExecutor(k, initializer=init, thread_name_prefix="patchcore-stage") as pool:
        pending = collections.deque()
        for batch in batches:
            pending.append(pool.submit(fn, batch))
            if len(pending) >= 2 * k:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def rebatched(batches, size: int):
    """Batches of ``size`` consecutive rows (the last one shorter) from batches of any size, in order:
    the batches Ray Data forms from a stage's outputs (tile rows of one image each) for the next."""
    pending, n = [], 0
    for batch in batches:
        pending.append(batch)
        n += len(batch["uri"])
        while n >= size:
            merged = {k: np.concatenate([b[k] for b in pending]) for k in pending[0]}
            yield {k: v[:size] for k, v in merged.items()}
            n -= size
            pending = [{k: v[size:] for k, v in merged.items()}] if n else []
    if n:
        yield {k: np.concatenate([b[k] for b in pending]) for k in pending[0]}
