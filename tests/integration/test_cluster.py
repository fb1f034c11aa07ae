"""The way users run on a cluster: `ray start --head`, then `ray job submit` of fit and score."""
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

from helpers import ROOT
from ray_head import RAY, init_local_ray, pids_with, start_head, stop_head, terminate
from patchcore_dist.artifacts.scores import read_scores

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
        init_local_ray()


def run_job_submit(category: str, tmp_path) -> None:
    """The essential steps: a head of our own (temp dir, ports, HOME with its own auth token: other Ray
    instances on the machine and the user's ~/.ray untouched), `ray job submit` of fit and score, and
    a stop of only the head's own processes."""
    head = start_head(num_cpus=3, token=True)
    try:
        env = head.env
        assert os.path.exists(os.path.join(head.home, ".ray", "auth_token"))
        address = head.dashboard
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
        stop_head(head)
    assert not head.pids() and not os.path.exists(head.temp_dir)


def test_ray_job_submit_fit_and_score(category, tmp_path):
    """The session's local instance keeps running (the head has its own ports and temp dir)."""
    import ray
    run_job_submit(category, tmp_path)
    assert not ray.is_initialized() or ray.cluster_resources()  # the session's instance still answers


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


@contextlib.contextmanager
def _own_cluster():
    """ray.cluster_utils.Cluster of two nodes in a temporary folder of its own (RAY_TMPDIR while it runs:
    its address file and sessions there, not in the shared /tmp/ray), shut down at the end: only its
    processes end (any left are ended by PID), the folder is removed and the session's instance restarted."""
    import ray
    from ray.cluster_utils import Cluster
    was_running = ray.is_initialized()
    ray.shutdown()  # the session's local instance: started again at the end for the later tests
    temp_dir = tempfile.mkdtemp(prefix="/tmp/pcr")
    os.mkdir(os.path.join(temp_dir, "ray"))  # what Ray takes as its default folder under RAY_TMPDIR
    before = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = temp_dir
    cluster = None
    try:
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"node_a": 1},
                                                                "include_dashboard": False,
                                                                "temp_dir": os.path.join(temp_dir, "ray")})
        cluster.add_node(num_cpus=2, resources={"node_b": 1})
        yield cluster
    finally:
        ray.data.DataContext.get_current().wait_for_min_actors_s = -1
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        left = terminate(pids_with(temp_dir) - {os.getpid()})
        if before is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = before
        shutil.rmtree(temp_dir, ignore_errors=True)
        _restore_session_ray(was_running)
    assert not left, f"processes of the test's cluster still alive after its shutdown: {sorted(left)}"


def test_two_node_cluster_fit_and_score_on_s3(category, s3, bucket, tmp_path):
    """A cluster of two nodes on loopback (each 2 CPUs and its own custom resource): fit and score run
    with the actors Ray places on its nodes, the shards and outputs on the S3 server; a local output is refused
    (workers on other nodes cannot see the driver's disk) unless storage.shared_paths declares it."""
    import uuid

    import pytest
    import ray

    from patchcore_dist.artifacts import storage
    from patchcore_dist.artifacts.runs import read_runs
    from patchcore_dist.config import load_config
    from patchcore_dist.errors import JobError
    from patchcore_dist.pipeline.cluster import check_cluster_paths
    from patchcore_dist.pipeline.fit import run_fit
    from patchcore_dist.pipeline.score import run_score

    with _own_cluster() as cluster:
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
        # the run names the cluster's nodes whose actors did its work (which actor gets which of a few
        # batches is Ray's scheduling, not ours: asserting both would depend on timing)
        assert set(read_runs(f"{root}/model", opts)[-1]["nodes"]) <= nodes
        assert read_runs(f"{root}/model", opts)[-1]["nodes"]
        summary = run_score(f"{root}/model", f"{root}/test", f"{root}/out", overrides=over)
        assert summary["rows"] == n and summary["errors"] == 0
        assert read_runs(f"{root}/out", opts)[-1]["nodes"] and set(read_runs(f"{root}/out", opts)[-1]["nodes"]) <= nodes
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
