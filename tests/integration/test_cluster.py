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


def test_ray_job_submit_fit_and_score(category, tmp_path):
    import ray
    ray.shutdown()  # `ray stop` below ends every Ray process on this machine; later tests start afresh
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
        table = read_scores(out)
        n = sum(len(f) for _, _, f in os.walk(f"{category}/test"))
        assert table.num_rows == n and table.column("error").null_count == n
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)
