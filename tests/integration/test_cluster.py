"""The way users run on a cluster: `ray start --head`, then `ray job submit` of fit and score."""
import json
import os
import socket
import subprocess
import sys


from helpers import ROOT
from patchcore_dist.artifacts.scores import read_scores

RAY = os.path.join(os.path.dirname(sys.executable), "ray")


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_job_agent(address: str, env: dict, attempts: int = 60) -> None:
    """`ray start` returns before the dashboard's job agent takes submissions: poll until it lists jobs."""
    import time
    for _ in range(attempts):
        r = subprocess.run([RAY, "job", "list", "--address", address], env=env, capture_output=True, text=True,
                           timeout=60)
        if r.returncode == 0:
            return
        time.sleep(2)
    raise AssertionError(f"the job agent at {address} never came up: {r.stderr[-2000:]}")


def _submit(cmd: list[str], env: dict, attempts: int = 60):
    """`ray job submit`, again while the head has no job agent registered yet (it answers 500 "No
    available agent" until the agent of a node is up; a loaded machine takes longer)."""
    import time
    for _ in range(attempts):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if r.returncode == 0 or "No available agent" not in r.stdout + r.stderr:
            return r
        time.sleep(2)
    return r


def _restore_session_ray(was_running: bool) -> None:
    """The session's local instance again (as the ray_local fixture starts it), so that the later tests
    still run their jobs on Ray (runtime.executor=auto reuses a running instance)."""
    import ray
    if was_running and not ray.is_initialized():
        ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False)


def test_ray_job_submit_fit_and_score(category, tmp_path):
    import ray
    was_running = ray.is_initialized()
    ray.shutdown()  # `ray stop` below ends every Ray process on this machine; the session's instance is restarted
    env = dict(os.environ, RAY_AUTH_MODE="token")
    subprocess.run([RAY, "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    port, dash = _port(), _port()
    start = subprocess.run([RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                            "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--num-cpus", "3"],
                           env=env, capture_output=True, text=True, timeout=180)
    assert start.returncode == 0, start.stdout + start.stderr
    try:
        address = f"http://127.0.0.1:{dash}"
        _wait_for_job_agent(address, env)
        runtime_env = json.dumps({"excludes": [".venv", ".git", "demo_out", "benchmarks/data", ".whl"]})
        model, out = str(tmp_path / "model"), str(tmp_path / "out")
        small = ["image.resize=128", "image.crop=128", "runtime.num_actors=1"]
        for args in (["jobs/fit.py", "--train", f"{category}/train/good", "--model", model] + small,
                     ["jobs/score.py", "--model", model, "--images", f"{category}/test", "--output", out] + small):
            r = _submit([RAY, "job", "submit", "--address", address, "--working-dir", ROOT,
                         "--runtime-env-json", runtime_env, "--", sys.executable] + args, env)
            assert r.returncode == 0 and "succeeded" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
        assert "score done" in r.stdout  # the job's summary line reaches the submitter
        # a relative model path would be written into Ray's temporary package (deleted after the job): refused
        r = _submit([RAY, "job", "submit", "--address", address, "--working-dir", ROOT, "--runtime-env-json",
                     runtime_env, "--", sys.executable, "jobs/fit.py", "--train", f"{category}/train/good",
                     "--model", "runs/rel-model"] + small, env)
        assert r.returncode != 0 and "--model runs/rel-model is a relative path" in r.stdout + r.stderr, r.stdout[-3000:]
        table = read_scores(out)
        n = sum(len(f) for _, _, f in os.walk(f"{category}/test"))
        assert table.num_rows == n and table.column("error").null_count == n
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)
        _restore_session_ray(was_running)


def _upload(folder: str, uri: str, endpoint: str) -> int:
    """Copy a local folder of images to object storage; returns the number of files."""
    from patchcore_dist.artifacts import storage
    n = 0
    for dirpath, _, files in os.walk(folder):
        for name in files:
            rel = os.path.relpath(os.path.join(dirpath, name), folder)
            with open(os.path.join(dirpath, name), "rb") as f:
                storage.write_bytes(storage.join(uri, rel), f.read(), endpoint_url=endpoint)
            n += 1
    return n


def test_two_node_cluster_fit_and_score_on_s3(category, s3, bucket, tmp_path):
    """A cluster of two nodes on loopback (each 2 CPUs and its own custom resource): fit and score run
    with actors on both nodes, the shards and outputs on the S3 server; a local output is refused
    (workers on other nodes cannot see the driver's disk) unless storage.shared_paths declares it."""
    import uuid

    import pytest
    import ray
    from ray.cluster_utils import Cluster

    from patchcore_dist.artifacts import storage
    from patchcore_dist.artifacts.runs import read_runs
    from patchcore_dist.config import load_config
    from patchcore_dist.errors import JobError
    from patchcore_dist.pipeline.cluster import check_cluster_paths
    from patchcore_dist.pipeline.fit import run_fit
    from patchcore_dist.pipeline.score import run_score

    was_running = ray.is_initialized()
    ray.shutdown()  # the session's local instance: started again at the end for the later tests
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"node_a": 1},
                                                            "include_dashboard": False})
    cluster.add_node(num_cpus=2, resources={"node_b": 1})
    context = None
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert len(nodes) == 2 and {"node_a", "node_b"} <= set(ray.cluster_resources())
        context = ray.data.DataContext.get_current()
        context.wait_for_min_actors_s = 600  # both actors up before the first batch: each gets batches
        root = f"s3://{bucket}/two-nodes-{uuid.uuid4().hex[:8]}"
        _upload(f"{category}/train/good", f"{root}/train", s3)
        n = _upload(f"{category}/test/good", f"{root}/test/good", s3) + _upload(
            f"{category}/test/scratch", f"{root}/test/scratch", s3)
        over = ["image.resize=128", "image.crop=128", "runtime.batch_size=2", "runtime.num_actors=2",
                f"storage.endpoint_url={s3}"]
        opts = {"endpoint_url": s3, "region": None}
        manifest = run_fit(f"{root}/train", f"{root}/model", load_config(None, over))
        assert manifest["training"]["errors"] == 0 and manifest["bank"]["rows"] > 0
        assert set(read_runs(f"{root}/model", opts)[-1]["nodes"]) == nodes  # actors of both nodes extracted
        summary = run_score(f"{root}/model", f"{root}/test", f"{root}/out", overrides=over)
        assert summary["rows"] == n and summary["errors"] == 0
        assert set(read_runs(f"{root}/out", opts)[-1]["nodes"]) == nodes  # and both scored
        rows = read_scores(f"{root}/out", opts).to_pylist()
        assert len(rows) == n and all(r["heatmap"].startswith(root + "/out/heatmaps/") for r in rows)
        assert all(storage.exists(r["heatmap"], **opts) for r in rows)

        local = str(tmp_path / "out")
        with pytest.raises(JobError, match="cannot see this machine's disk.*--output"):
            run_score(f"{root}/model", f"{root}/test", local, overrides=over)
        assert not os.path.exists(local)  # refused before any work
        # declared shared between the nodes (an NFS mount; on loopback it is shared): accepted
        shared = load_config(None, over + [f"storage.shared_paths=[{tmp_path}]"])
        check_cluster_paths(shared, {"--model": f"{root}/model", "--output": local, "--images": str(tmp_path / "x")})
        with pytest.raises(JobError, match="--images /elsewhere"):
            check_cluster_paths(shared, {"--output": local, "--images": "/elsewhere"})
    finally:
        if context is not None:
            context.wait_for_min_actors_s = -1
        ray.shutdown()
        cluster.shutdown()
        _restore_session_ray(was_running)
