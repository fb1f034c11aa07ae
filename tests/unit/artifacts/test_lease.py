"""A second fit into a model URI where a fit is running is refused before it touches anything
(a lease created with create-if-absent semantics), locally and on S3."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from patchcore_dist.artifacts import storage
from patchcore_dist.artifacts.model import LEASE, acquire_fit_lease, clean_uncommitted, release_fit_lease
from patchcore_dist.config import load_config
from patchcore_dist.errors import JobError
from patchcore_dist.pipeline.fit import run_fit


def test_a_second_fit_is_refused_while_the_first_holds_the_lease(tmp_path):
    model = tmp_path / "model"
    lease = acquire_fit_lease(str(model), {})  # the first fit, running
    (model / "features").mkdir()
    (model / "features" / "part-0123abcd.parquet").write_bytes(b"the first fit's shard")
    with pytest.raises(JobError, match=r"a fit into .* is running \(lease .*\.fit-lease: host .*, pid "
                                       rf"{os.getpid()}, since .*\); wait for it"):
        run_fit(str(tmp_path), str(model), load_config())
    assert (model / "features" / "part-0123abcd.parquet").read_bytes() == b"the first fit's shard"
    clean_uncommitted(str(model), {})  # the running fit's own cleanup keeps its lease
    assert os.path.exists(lease)
    release_fit_lease(lease, {})
    again = acquire_fit_lease(str(model), {})  # free again
    release_fit_lease(again, {})


def test_the_lease_of_a_killed_fit_on_this_host_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    model = tmp_path / "model"
    model.mkdir()
    stale = {"host": __import__("socket").gethostname(), "pid": dead.pid, "token": "x", "started": "then"}
    (model / LEASE).write_text(json.dumps(stale))
    lease = acquire_fit_lease(str(model), {})
    assert json.loads(open(lease).read())["pid"] == os.getpid() and os.listdir(model) == [LEASE]
    release_fit_lease(lease, {})
    (model / LEASE).write_text(json.dumps(dict(stale, host="another-host")))  # cannot tell: refused
    with pytest.raises(JobError, match="delete .*fit-lease"):
        acquire_fit_lease(str(model), {})


def test_exactly_one_of_concurrent_creators_wins(tmp_path, s3, bucket):
    opts = {"endpoint_url": s3}
    for uri in (str(tmp_path / "x" / "marker"), f"s3://{bucket}/lease-race/marker"):
        def create(i):
            try:
                storage.create_exclusive(uri, str(i).encode(), **opts)
                return i
            except FileExistsError:
                return None
        with ThreadPoolExecutor(8) as pool:
            winners = [w for w in pool.map(create, range(8)) if w is not None]
        assert len(winners) == 1 and storage.read_bytes(uri, **opts) == str(winners[0]).encode()


def test_a_second_fit_into_an_s3_model_is_refused(tmp_path, s3, bucket):
    over = [f"storage.endpoint_url={s3}"]
    model = f"s3://{bucket}/leased/model"
    lease = acquire_fit_lease(model, {"endpoint_url": s3})
    storage.write_bytes(f"{model}/features/part-00ff.parquet", b"shard", endpoint_url=s3)
    with pytest.raises(JobError, match="is running"):
        run_fit(str(tmp_path), model, load_config(None, over))
    assert storage.read_bytes(f"{model}/features/part-00ff.parquet", endpoint_url=s3) == b"shard"
    release_fit_lease(lease, {"endpoint_url": s3})
    assert not storage.exists(lease, endpoint_url=s3)
