"""Ray: join a cluster (RAY_ADDRESS) or start a local instance; size the actor pools."""
from __future__ import annotations

import logging
import os
import sys
import time

from ..artifacts import storage
from ..config import Config
from ..errors import JobError

log = logging.getLogger(__name__)


VERBOSE_ENV = "PATCHCORE_VERBOSE"  # set by the command line's --verbose: Ray's own INFO logs too


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


class _DropNotices(logging.Filter):
    """Ray's start-up notices that say nothing about the job (token authentication is on by default)."""
    NOTICES = ("Token authentication is enabled",)

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.NOTICES)


def quiet_ray_logs() -> None:
    """The console shows the job's own progress lines and Ray's warnings and errors only (everything
    with ``--verbose``); Ray Data's full logs still go to its session log files.

    Ray configures its loggers when it is imported, so this runs after the import. Ray Data's progress
    bars stay off (we draw our own), and so does its notice that they are off. The workers' own output
    is forwarded to the driver with ``--verbose`` only (``log_to_driver``); it is always in Ray's
    session logs, and a failing image's reason is always in its error row. Ray's C++ core writes
    straight to stderr: its one notice per actor pool (constructor arguments in the object store) is
    left alone, because the only switch for it (``RAY_BACKEND_LOG_LEVEL``) also empties Ray's log files.
    """
    import ray
    import ray.data
    from ray.util import log_once
    ray.data.DataContext.get_current().enable_progress_bars = False
    log_once("ray_data_progress_manager_disabled")
    if verbose():
        return
    logging.getLogger("ray").setLevel(logging.WARNING)
    for name in ("ray", "ray.data"):
        for handler in logging.getLogger(name).handlers:
            if not type(handler).__module__.startswith("ray"):
                continue  # not Ray's (a test's log capture, an application's own handler): left alone
            if not isinstance(handler, logging.FileHandler) and "File" not in type(handler).__name__:
                handler.setLevel(logging.WARNING)
            if not any(isinstance(f, _DropNotices) for f in handler.filters):
                handler.addFilter(_DropNotices())


def ray_running() -> bool:
    """Whether this process is already connected to Ray (never imports Ray to find out)."""
    ray = sys.modules.get("ray")
    return ray is not None and hasattr(ray, "is_initialized") and ray.is_initialized()


def use_ray(config: Config, images: int) -> bool:
    """Whether a job over ``images`` images runs its stages on Ray (else in this process, the same stage
    functions over the same batches, without starting Ray).

    runtime.executor decides; ``auto`` chooses by what each costs. Ray when a cluster is there
    (RAY_ADDRESS, or this process already connected to Ray: a running instance costs nothing to
    reuse), when the machine has more than one GPU (one process drives one), when an injected fault
    exits its process (in process, that would be the job's own: faults that raise or stop run here),
    or when the job is over runtime.local_max_images (if set). Otherwise in process: on one machine
    Ray adds its start-up (about 13 s on 2 cores) and moves every batch through its object store,
    and the in-process executor was as fast or faster at every job size measured (the curve in
    docs/operations.md), so no job size makes the default slower than the better of the two. What
    the default trades: in process, a crash of the process (a codec's segfault, an out-of-memory
    kill) ends the job, where Ray restarts the worker and retries the batch; committed rows are kept
    and the next run scores the rest.
    """
    from . import faults
    rt = config.runtime
    exiting = faults.exits(faults.from_env())
    if rt.executor != "auto":
        if rt.executor == "local" and exiting:
            raise JobError(f"{faults.FAULT_ENV} (fault injection) needs runtime.executor=ray or auto: an injected "
                           "fault exits the worker process, which would be this job's own process")
        return rt.executor == "ray"
    over = rt.local_max_images is not None and images > rt.local_max_images
    return bool(os.environ.get("RAY_ADDRESS") or ray_running() or exiting or over or _gpus(rt.device) > 1)


def _gpus(device: str) -> int:
    """CUDA devices this job could use (0 with runtime.device=cpu)."""
    if device == "cpu":
        return 0
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def node_id() -> str:
    """The Ray node this process runs on ("local" outside Ray): recorded per batch, so that a run says
    which nodes did its work."""
    if not ray_running():
        return "local"
    import ray
    try:
        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001  (a worker without a node id is no reason to fail a batch)
        return "unknown"


def check_cluster_paths(config: Config, paths: dict[str, str | None]) -> None:
    """Refuse, before any work, a local path (``--model``, ``--output``, the images...) when the job runs
    on a multi-node Ray cluster: the workers on other nodes cannot see this machine's disk (they would
    read nothing, or write shards and heatmaps where the driver never looks). A path under one of
    storage.shared_paths (a folder every node mounts at the same place, such as NFS) is allowed.
    Only a job that joins a cluster (RAY_ADDRESS, or a process already connected to Ray) is checked: an
    instance this job starts has one node."""
    if config.runtime.executor == "local" or not (os.environ.get("RAY_ADDRESS") or ray_running()):
        return
    ray = init_ray(config)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return
    shared = config.storage.shared_paths
    local = []
    for what, uri in paths.items():
        if not uri or storage.is_s3(uri):
            continue
        path = storage.resolve(uri)[1]
        if not any(path == s or path.startswith(s + "/") for s in shared):
            local.append(f"{what} {uri}")
    if local:
        raise JobError(f"this Ray cluster has {len(nodes)} nodes, and the workers on other nodes cannot see this "
                       f"machine's disk: {'; '.join(local)} is a local path. Use object storage (s3://...), or, "
                       "if the path is a folder every node mounts at the same place (NFS), declare it: "
                       "storage.shared_paths=[/mnt/nfs]")


def init_ray(config: Config):
    """Join the cluster at RAY_ADDRESS, or start a local instance (once per process)."""
    import ray
    quiet_ray_logs()
    if ray.is_initialized():
        return ray
    address = os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=verbose())
    else:
        # A local instance. Leave room for the decode tasks beside the actors: with every CPU
        # held by actors the read/decode tasks starve (seen on 2 cores).
        num_cpus = config.runtime.ray_num_cpus or max(2, (os.cpu_count() or 2) + 1)
        log.info("starting a local Ray instance (%d logical CPUs)", num_cpus)
        # address="local": without it ray.init joins any cluster `ray start` left on this machine
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=verbose())
    return ray


def actor_pool(config: Config, images: int | None = None) -> dict:
    """map_batches arguments for the backbone actors: one per GPU when the cluster has GPUs, with
    ``batch_size`` (runtime.gpu_batch_size on GPU actors, runtime.batch_size on CPU actors). With
    ``images``, never more actors than the job has batches (each actor costs seconds to start). CPU
    actors leave one logical CPU to the driver and the decode tasks (a local instance has one more
    than the machine's cores for them; measured on 2 cores, an actor more than the cores is slower,
    not faster)."""
    import ray
    from ray.data import ActorPoolStrategy
    gpus = int(ray.cluster_resources().get("GPU", 0))
    rt = config.runtime
    if gpus > 0 and rt.device != "cpu":
        size = _fit_to_work(rt.num_actors or gpus, images, rt.batch_for("cuda"))
        log.info("actor pool: %d GPU actor(s), batch size %d", size, rt.batch_for("cuda"))
        return {"compute": ActorPoolStrategy(size=size), "num_gpus": 1, "num_cpus": 1,
                "batch_size": rt.batch_for("cuda")}
    if rt.device == "cuda":
        raise JobError("runtime.device=cuda but the Ray cluster has no GPUs: use runtime.device=auto or cpu")
    cpus = int(ray.cluster_resources().get("CPU", 1))
    if rt.actor_cpus > cpus:
        raise JobError(f"runtime.actor_cpus={rt.actor_cpus} but the Ray cluster has {cpus} CPUs: no actor could "
                       "be placed (the job would wait forever); lower runtime.actor_cpus")
    free = cpus - 1 if cpus > 2 else rt.actor_cpus
    size = _fit_to_work(rt.num_actors or max(1, int(free // rt.actor_cpus)), images, rt.batch_for("cpu"))
    log.info("actor pool: %d CPU actor(s) x %.1f CPU, batch size %d", size, rt.actor_cpus, rt.batch_for("cpu"))
    return {"compute": ActorPoolStrategy(size=size), "num_cpus": rt.actor_cpus, "batch_size": rt.batch_for("cpu")}


def _fit_to_work(size: int, images: int | None, batch_size: int) -> int:
    return size if images is None else max(1, min(size, -(-images // batch_size)))


def map_in_tasks(batches, fn, fn_kwargs: dict, num_cpus: float = 0.5, in_flight: int | None = None):
    """``fn(batch, **fn_kwargs)`` as Ray tasks over a stream of batches made on the driver, at most
    ``in_flight`` at once (default: the cluster's CPUs); results in completion order. A task whose
    worker dies is retried by Ray."""
    import ray
    task = ray.remote(num_cpus=num_cpus)(fn)
    limit = in_flight or max(2, int(ray.cluster_resources().get("CPU", 2)))
    pending = []
    for batch in batches:
        pending.append(task.remote(batch, **fn_kwargs))
        while len(pending) >= limit:
            done, pending = ray.wait(pending, num_returns=1)
            yield ray.get(done[0])
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        yield ray.get(done[0])


def output_batches(ds):
    """The output batches (numpy) of a Ray dataset; an iterable of batches (the in-process stages)
    as it is."""
    return ds.iter_batches(batch_size=None, batch_format="numpy") if hasattr(ds, "iter_batches") else ds


def iterate_with_progress(ds, total: int, what: str, every: float = 5.0, count=None):
    """The output batches (numpy) of a Ray dataset, or of an iterable of batches (the in-process
    stages), with progress: a bar with rate and ETA on a terminal, else one line every ``every``
    seconds (images done, errors, rate). ``count(batch)``: the images a batch completes (default:
    its rows)."""
    import sys
    bar = None
    if sys.stderr.isatty():
        from tqdm import tqdm
        bar = tqdm(total=total, desc=what, unit="img", dynamic_ncols=True, leave=False)
    t0 = last = time.time()
    done = errors = 0
    try:
        for batch in output_batches(ds):
            n = count(batch) if count else len(batch["uri"])
            done += n
            errors += sum(1 for e in batch["error"] if isinstance(e, str) and e)
            yield batch
            if bar is not None:
                bar.set_postfix(errors=errors, refresh=False)
                bar.update(n)
            elif time.time() - last > every:
                last = time.time()
                log.info("%s", progress_line(what, done, total, errors, last - t0))
    finally:
        if bar is not None:
            bar.close()


def progress_line(what: str, done: int, total: int, errors: int, elapsed: float) -> str:
    """One progress line: images done of the total, errors, the rate (images/s, or s/image below one
    image a second) and, once the rate is known, the time left at that rate."""
    head = f"{what}: {done} / {total} images ({errors} errors)"
    if done <= 0 or elapsed <= 0:
        return f"{head}, rate not known yet"
    rate = done / elapsed
    speed = f"{rate:.1f} images/s" if rate >= 1 else f"{1 / rate:.1f} s/image"
    return f"{head}, {speed}, ETA {_duration(max(0, total - done) / rate)}"


def _duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``2 h 07 min``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"
