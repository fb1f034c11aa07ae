"""Ray: join a cluster (RAY_ADDRESS) or start a local instance; size the actor pools."""
from __future__ import annotations

import logging
import os
import time

from ..config import Config
from ..errors import JobError

log = logging.getLogger(__name__)


def _quiet_data_progress() -> None:
    """Our jobs log their own progress (images done, errors, images/s); Ray Data's per-operator
    progress blocks every few seconds would drown it in non-interactive logs."""
    import ray.data
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False


def init_ray(config: Config):
    import ray
    _quiet_data_progress()
    if ray.is_initialized():
        return ray
    address = os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
    else:
        # A local instance. Leave room for the decode tasks beside the actors: with every CPU
        # held by actors the read/decode tasks starve (seen on 2 cores).
        num_cpus = config.runtime.ray_num_cpus or max(2, (os.cpu_count() or 2) + 1)
        log.info("starting a local Ray instance (%d logical CPUs)", num_cpus)
        # address="local": without it ray.init joins any cluster `ray start` left on this machine
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
    return ray


def actor_pool(config: Config) -> dict:
    """map_batches arguments for the backbone actors: one per GPU when the cluster has GPUs, with
    ``batch_size`` (runtime.gpu_batch_size on GPU actors, runtime.batch_size on CPU actors)."""
    import ray
    from ray.data import ActorPoolStrategy
    gpus = int(ray.cluster_resources().get("GPU", 0))
    rt = config.runtime
    if gpus > 0 and rt.device != "cpu":
        size = rt.num_actors or gpus
        log.info("actor pool: %d GPU actor(s), batch size %d", size, rt.batch_for("cuda"))
        return {"compute": ActorPoolStrategy(size=size), "num_gpus": 1, "num_cpus": 1,
                "batch_size": rt.batch_for("cuda")}
    if rt.device == "cuda":
        raise JobError("runtime.device=cuda but the Ray cluster has no GPUs: use runtime.device=auto or cpu")
    cpus = int(ray.cluster_resources().get("CPU", 1))
    if rt.actor_cpus > cpus:
        raise JobError(f"runtime.actor_cpus={rt.actor_cpus} but the Ray cluster has {cpus} CPUs: no actor could "
                       "be placed (the job would wait forever); lower runtime.actor_cpus")
    size = rt.num_actors or max(1, int((cpus - 1) // rt.actor_cpus) if cpus > 2 else 1)
    log.info("actor pool: %d CPU actor(s) x %.1f CPU, batch size %d", size, rt.actor_cpus, rt.batch_for("cpu"))
    return {"compute": ActorPoolStrategy(size=size), "num_cpus": rt.actor_cpus, "batch_size": rt.batch_for("cpu")}


def iterate_with_progress(ds, total: int, what: str, every: float = 5.0):
    """The dataset's output batches (numpy); every ``every`` seconds one line: images done, errors, rate."""
    t0 = last = time.time()
    done = errors = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        done += len(batch["uri"])
        errors += sum(1 for e in batch["error"] if isinstance(e, str) and e)
        yield batch
        if time.time() - last > every:
            last = time.time()
            log.info("%s: %d / %d images (%d errors), %.1f images/s", what, done, total, errors, done / (last - t0))
