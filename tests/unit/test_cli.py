"""The command line: one `patchcore` command with every job, the same commands as scripts and as
jobs/*.py, and every deliberate failure mapped to a message and an exit code."""
from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import ROOT
from patchcore_dist import cli
from patchcore_dist.errors import ConfigError, DeviceError, JobError, PatchCoreError


def test_patchcore_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in ("fit", "score", "evaluate", "synthesize", "demo"):
        assert name in out


@pytest.mark.parametrize("name,flag", [("fit", "--train"), ("score", "--images"), ("evaluate", "--dataset"),
                                       ("synthesize", "--normal"), ("demo", "--categories")])
def test_each_command_help_lists_its_arguments_and_config_keys(capsys, name, flag):
    with pytest.raises(SystemExit):
        cli.main([name, "--help"])
    out = capsys.readouterr().out
    assert flag in out and "--config" in out and "coreset.ratio" in out


def test_known_failures_are_one_message_and_exit_code(capsys):
    def fails(exc):
        def run(_):
            raise exc
        return run
    for exc in (ConfigError("bad key"), JobError("no images"), DeviceError("no GPU"), FileNotFoundError("x")):
        assert cli.run_job(fails(exc), None) == 2
        assert capsys.readouterr().err.startswith("error: ")
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        cli.run_job(fails(ZeroDivisionError()), None)


def test_every_error_is_a_patchcore_error():
    from patchcore_dist import errors
    classes = [v for v in vars(errors).values() if isinstance(v, type) and issubclass(v, Exception)]
    assert len(classes) >= 8 and all(issubclass(c, PatchCoreError) for c in classes)


def test_a_bad_override_ends_before_any_work(tmp_path):
    r = subprocess.run([sys.executable, "-m", "patchcore_dist.cli", "fit", "--train", str(tmp_path), "--model",
                        str(tmp_path / "m"), "index.type=ivf_pq", "index.pq_m=60"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "index.pq_m (60) must divide embedding.target_dim (1024)" in r.stderr
    assert "Traceback" not in r.stderr
