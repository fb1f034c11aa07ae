"""The fit lease (artifacts/lease.py), locally and on S3: a second fit into a model URI where a fit runs
is refused before it touches anything; a lease is taken over only on proof that its holder is dead, by a
compare-and-swap of which exactly one of simultaneous take-overs wins; release removes only our own
lease; a fit removes files only in a folder its own marker says a fit wrote (issue 25, findings 6 and 8).
Races are injected deterministically: the steps of two fits are called interleaved."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import yaml
from PIL import Image

from patchcore_dist.artifacts import lease as fl
from patchcore_dist.artifacts import storage
from patchcore_dist.artifacts.lease import (LEASE, MARKER, acquire_fit_lease, clean_uncommitted, holder_identity,
                                            read_lease, release_fit_lease, take_over, why_not_dead)
from patchcore_dist.cli import main
from patchcore_dist.config import load_config
from patchcore_dist.errors import JobError
from patchcore_dist.pipeline.fit import run_fit


def _dead_pid() -> int:
    """The pid of a process that ran and was reaped."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _stale(**changes) -> bytes:
    """The lease of a fit killed in this machine's boot and PID namespace (unless ``changes`` say else)."""
    held = dict(holder_identity(), pid=_dead_pid(), pid_start=12345, started="then")
    return json.dumps(dict(held, **changes)).encode()


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    """(a model URI, its storage options, a reader of the lease's bytes, a writer of them): local and S3."""
    if request.param == "local":
        model, opts = str(tmp_path / "model"), {}
    else:
        s3, bucket = request.getfixturevalue("s3"), request.getfixturevalue("bucket")
        model, opts = f"s3://{bucket}/lease/{tmp_path.name}/model", {"endpoint_url": s3}
    uri = storage.join(model, LEASE)
    return model, opts, lambda: storage.read_bytes(uri, **opts), lambda b: storage.write_bytes(uri, b, **opts)


def test_a_second_fit_is_refused_while_the_first_holds_the_lease(tmp_path):
    model = tmp_path / "model"
    first = acquire_fit_lease(str(model), {})  # the first fit, running
    clean_uncommitted(str(model), {})          # ... marks the folder, then writes a shard
    (model / "features").mkdir()
    (model / "features" / "part-0123abcd.parquet").write_bytes(b"the first fit's shard")
    with pytest.raises(JobError, match=rf"a fit into .* is running .*\(lease .*\.fit-lease: host .*, pid {os.getpid()}"
                                       r", PID namespace pid:\[\d+\], .*\): its process is running\. Wait for"):
        run_fit(str(tmp_path), str(model), load_config())
    assert (model / "features" / "part-0123abcd.parquet").read_bytes() == b"the first fit's shard"
    assert (model / LEASE).read_bytes() == first.body
    release_fit_lease(first, {})
    assert not (model / LEASE).exists()
    release_fit_lease(acquire_fit_lease(str(model), {}), {})  # free again


def test_the_lease_of_a_killed_fit_is_taken_over(where):
    model, opts, read, write = where
    write(_stale())  # its pid is not running
    taken = acquire_fit_lease(model, opts)
    assert read() == taken.body and json.loads(taken.body)["pid"] == os.getpid()
    release_fit_lease(taken, opts)
    write(_stale(pid=os.getpid(), pid_start=1))  # our pid, but another start time: the holder's pid was reused
    release_fit_lease(acquire_fit_lease(model, opts), opts)
    assert not storage.exists(storage.join(model, LEASE), **opts)


def test_the_lease_of_an_exited_unreaped_fit_is_taken_over(tmp_path):
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    start = fl._start_time(p.pid)
    os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped: a zombie with its pid and start
    try:
        assert fl._stat_fields(p.pid)[0] == "Z"
        assert why_not_dead(dict(holder_identity(), pid=p.pid, pid_start=start)) is None
    finally:
        p.wait()


def test_a_lease_that_cannot_be_proven_dead_is_never_taken_over(where):
    """Finding 6: a live fit in another container on this host (same hostname, another PID namespace) held
    a lease that a pid-only check took over. Now another namespace, another boot, an older lease or a
    running holder are refused with the holder's details, and the lease is left as it is."""
    model, opts, read, write = where
    cases = {"another PID namespace": _stale(pid_ns="pid:[4026532999]"),
             "another boot id": _stale(boot_id="00000000-0000-0000-0000-000000000000"),
             "does not say which process": json.dumps({"host": "h", "pid": _dead_pid()}).encode(),  # older version
             "its process is running": json.dumps(holder_identity()).encode()}  # this very process
    for why, body in cases.items():
        write(body)
        with pytest.raises(JobError, match=rf"cannot be proven dead \(lease .*: host .*, pid .*\): .*{why}.* delete "
                                           rf".*{LEASE} and run again"):
            acquire_fit_lease(model, opts)
        assert read() == body


def test_of_two_simultaneous_take_overs_exactly_one_wins(where):
    model, opts, read, write = where
    uri, stale = storage.join(model, LEASE), _stale()
    write(stale)
    a, b = (json.dumps(holder_identity()).encode() for _ in range(2))
    (held_a, tag_a), (held_b, tag_b) = read_lease(uri, opts), read_lease(uri, opts)  # both read the stale lease
    assert why_not_dead(held_a) is None and why_not_dead(held_b) is None         # both judge it dead
    assert take_over(uri, tag_a, a, opts) is True
    assert take_over(uri, tag_b, b, opts) is False
    assert read() == a


def test_a_fit_that_loses_the_take_over_race_is_refused(where, monkeypatch):
    """Two whole fits: the second's take-over runs right after the first took the same stale lease over."""
    model, opts, read, write = where
    write(_stale())
    first, real = [], fl.take_over

    def late(uri, tag, body, opts):
        if not first:
            first.append(None)
            first[0] = acquire_fit_lease(model, opts)  # the other fit reads, judges and takes over first
        return real(uri, tag, body, opts)
    monkeypatch.setattr(fl, "take_over", late)
    with pytest.raises(JobError, match="its process is running"):
        acquire_fit_lease(model, opts)
    assert read() == first[0].body


def test_a_local_take_over_is_exclusive_inside_the_swap(tmp_path, monkeypatch):
    """The local compare-and-swap: a second swapper of the same stale lease arriving while the first is
    between its compare and its replace gets False; the first's replace lands."""
    uri = str(tmp_path / "model" / LEASE)
    storage.write_bytes(uri, _stale())
    _, tag = read_lease(uri, {})
    a, b = b'{"token": "a"}', b'{"token": "b"}'
    inner, real_write = [], storage.write_bytes

    def write_after_b(path, data, **kw):
        if data == a:  # a holds the claim and has compared: b swaps now
            inner.append(take_over(uri, tag, b, {}))
        return real_write(path, data, **kw)
    monkeypatch.setattr(storage, "write_bytes", write_after_b)
    assert take_over(uri, tag, a, {}) is True and inner == [False]
    assert open(uri, "rb").read() == a and sorted(os.listdir(tmp_path / "model")) == [LEASE]


def test_a_take_over_killed_half_way_refuses_until_its_claim_is_deleted(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / LEASE).write_bytes(stale := _stale())
    claim = model / f"{LEASE}.cas-{storage.read_tagged(str(model / LEASE))[1][:16]}"
    claim.write_bytes(b"")  # left by a fit killed between its claim and its replace
    with pytest.raises(JobError, match=r"could not be taken over .* delete .*\.fit-lease\.cas-\*"):
        acquire_fit_lease(str(model), {})
    assert (model / LEASE).read_bytes() == stale
    (model / LEASE).unlink()  # what the message says to do (the lease, and the claim)
    taken = acquire_fit_lease(str(model), {})
    clean_uncommitted(str(model), {})  # a leftover claim is ours: removed
    assert sorted(os.listdir(model)) == [LEASE, MARKER]
    release_fit_lease(taken, {})


def test_release_leaves_a_lease_that_is_not_ours(where):
    model, opts, read, write = where
    ours = acquire_fit_lease(model, opts)
    foreign = json.dumps(holder_identity()).encode()  # another token
    write(foreign)
    release_fit_lease(ours, opts)
    assert read() == foreign
    write(ours.body)
    release_fit_lease(ours, opts)
    assert not storage.exists(ours.uri, **opts)


def test_a_conditional_delete_leaves_a_lease_changed_after_it_was_read(where):
    """The gap between release's compare and its delete: the delete is conditional on what was read."""
    model, opts, read, write = where
    uri = storage.join(model, LEASE)
    write(b'{"token": "ours"}')
    _, tag = read_lease(uri, opts)
    write(b'{"token": "theirs"}')
    assert storage.delete_if_tag(uri, tag, **opts) is False and read() == b'{"token": "theirs"}'
    assert storage.delete_if_tag(uri, read_lease(uri, opts)[1], **opts) is True
    assert not storage.exists(uri, **opts)


def test_exactly_one_of_concurrent_creators_wins(tmp_path, s3, bucket):
    opts = {"endpoint_url": s3}
    for uri in (str(tmp_path / "x" / "marker"), f"s3://{bucket}/lease-race/marker"):
        def create(i, uri=uri):
            try:
                storage.create_exclusive(uri, str(i).encode(), **opts)
                return i
            except FileExistsError:
                return None
        with ThreadPoolExecutor(8) as pool:
            winners = [w for w in pool.map(create, range(8)) if w is not None]
        assert len(winners) == 1 and storage.read_bytes(uri, **opts) == str(winners[0]).encode()
    assert os.listdir(tmp_path / "x") == ["marker"]  # no temporary files left


def test_a_second_fit_into_an_s3_model_is_refused(tmp_path, s3, bucket):
    over = [f"storage.endpoint_url={s3}"]
    model = f"s3://{bucket}/leased/model"
    lease = acquire_fit_lease(model, {"endpoint_url": s3})
    storage.write_bytes(f"{model}/features/part-00ff.parquet", b"shard", endpoint_url=s3)
    with pytest.raises(JobError, match="is running"):
        run_fit(str(tmp_path), model, load_config(None, over))
    assert storage.read_bytes(f"{model}/features/part-00ff.parquet", endpoint_url=s3) == b"shard"
    release_fit_lease(lease, {"endpoint_url": s3})
    assert not storage.exists(lease.uri, endpoint_url=s3)


def _train(tmp_path) -> str:
    train = tmp_path / "train"
    train.mkdir()
    for i in range(3):
        Image.new("RGB", (64, 64), (40 * i, 90, 160)).save(train / f"{i}.png")
    return str(train)


def test_a_fit_into_the_folder_of_the_users_config_refuses_and_keeps_it(tmp_path):
    """Finding 8: ``--config proj/config.yaml --model proj`` deleted config.yaml (a folder of model-file
    names was taken for an interrupted fit). Now the fit refuses, naming the file, and changes nothing."""
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "config.yaml").write_bytes(mine := yaml.safe_dump({"seed": 7}).encode() + b"# my settings\n")
    train = _train(tmp_path)
    argv = ["fit", "--train", train, "--model", str(proj), "--config", str(proj / "config.yaml")]
    assert main(argv) == JobError.exit_code
    assert (proj / "config.yaml").read_bytes() == mine and os.listdir(proj) == ["config.yaml"]
    with pytest.raises(JobError, match=r"proj holds files no fit wrote \(config\.yaml\); .* nothing was changed"):
        run_fit(train, str(proj), load_config(str(proj / "config.yaml")))
    assert (proj / "config.yaml").read_bytes() == mine and os.listdir(proj) == ["config.yaml"]


def test_only_a_folder_an_interrupted_fit_marked_is_cleaned(where):
    model, opts, read, write = where
    join = lambda *p: storage.join(model, *p)  # noqa: E731
    storage.write_bytes(join("memory_bank.npy"), b"user's", **opts)  # unmarked: refused, kept
    taken = acquire_fit_lease(model, opts)
    with pytest.raises(JobError, match=r"holds files no fit wrote \(memory_bank\.npy\)"):
        clean_uncommitted(model, opts)
    assert storage.read_bytes(join("memory_bank.npy"), **opts) == b"user's"
    storage.write_bytes(join(MARKER), b"{}", **opts)  # what an interrupted fit leaves: marker, files, a dead lease
    storage.write_bytes(join("features", "part-0a.parquet"), b"shard", **opts)
    write(_stale())
    release_fit_lease(taken, opts)  # not ours any more: left
    taken = acquire_fit_lease(model, opts)
    clean_uncommitted(model, opts)
    assert sorted(r for _, r in storage.list_files(model, **opts)) == [LEASE, MARKER]
    storage.write_bytes(join("notes.txt"), b"mine", **opts)  # a marked folder with a foreign file: refused
    with pytest.raises(JobError, match=r"interrupted fit's folder but also holds other files \(notes\.txt\)"):
        clean_uncommitted(model, opts)
    storage.delete(join("notes.txt"), **opts)
    storage.write_bytes(join("manifest.json"), b"{}", **opts)  # committed: release removes the marker
    release_fit_lease(taken, opts)
    assert sorted(r for _, r in storage.list_files(model, **opts)) == ["manifest.json"]


def test_an_interrupted_fit_is_cleaned_up_and_the_next_fit_commits(tmp_path, monkeypatch):
    """The recovery the marker keeps: a fit interrupted after writing its shards (in process, executor=local)
    leaves them with its marker; the next fit into the same folder removes them and commits."""
    from helpers import SMALL
    from patchcore_dist.artifacts.model import load_model
    from patchcore_dist.pipeline import fit

    rng = np.random.default_rng(0)
    train = tmp_path / "train"
    train.mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(train / f"{i}.png")
    model, config = tmp_path / "model", load_config(None, SMALL + ["runtime.executor=local"])

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(fit, "commit_model", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run_fit(str(train), str(model), config)
    left = sorted(str(p.relative_to(model)) for p in model.rglob("*") if p.is_file())
    assert left[0] == MARKER and len(left) == 2 and left[1].startswith("features/part-")  # no lease: released
    manifest = run_fit(str(train), str(model), config)
    assert manifest["training"]["used"] == 4 and load_model(str(model)).digest == manifest["model_digest"]
    on_disk = {str(p.relative_to(model)) for p in model.rglob("*") if p.is_file() and "runs" not in p.parts}
    assert on_disk == set(manifest["files"]) | {"manifest.json"}  # the old shard is gone, and the marker
