"""The command line: one `patchcore` command with every job, the same commands as scripts and as
jobs/*.py, and every deliberate failure mapped to a message and an exit code."""
from __future__ import annotations

import argparse
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


@pytest.mark.parametrize("name,flag,key", [("fit", "--train", "coreset.ratio=0.1"),
                                           ("score", "--images", "runtime.device=auto"),
                                           ("evaluate", "--dataset", "output.heatmaps=true"),
                                           ("synthesize", "--normal", "seed=0"), ("demo", "--categories", "coreset.ratio"),
                                           ("runs", "--last", "storage.endpoint_url=null"),
                                           ("maintain", "--vacuum-hours", "storage.region")])
def test_each_command_help_lists_its_arguments_and_config_keys(capsys, name, flag, key):
    with pytest.raises(SystemExit):
        cli.main([name, "--help"])
    out = capsys.readouterr().out
    assert flag in out and "--config" in out and key in out and "docs/configuration.md" in out


def _epilog(capsys, argv):
    with pytest.raises(SystemExit):
        cli.main(argv + ["--help"])
    return capsys.readouterr().out.split("config keys (", 1)[1]


def test_help_lists_the_keys_the_command_uses(capsys):
    """One mapping (config.COMMAND_KEYS): fit-only keys under fit, not under score; storage under runs."""
    assert "coreset.ratio=0.1" in _epilog(capsys, ["fit"]) and "output.heatmaps" not in _epilog(capsys, ["fit"])
    score = _epilog(capsys, ["score"])
    assert "coreset" not in score and "backbone.name" not in score and "index.nprobe=16" in score
    runs = _epilog(capsys, ["runs"])
    assert all(k in runs for k in ("storage.endpoint_url", "storage.region", "storage.shared_paths"))
    assert "runtime." not in runs and "coreset" not in runs
    assert max(len(line) for line in score.splitlines()) <= 110 and len(score.splitlines()) <= 16


def test_keys_the_command_does_not_use_are_warned_about(caplog):
    args = argparse.Namespace(overrides=["coreset.ratio=0.01", "index.nprobe=4", "backbone.name=resnet18", "bad"],
                              verbose=False)
    with caplog.at_level("WARNING"):
        assert cli.run_job(lambda a: None, args, "score") == 0
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warned == ["coreset.ratio is a fit setting; score uses the model's (ignored here)"]
    caplog.clear()
    with caplog.at_level("WARNING"):
        cli.run_job(lambda a: None, argparse.Namespace(overrides=["coreset.ratio=0.01"], verbose=False), "fit")
        cli.run_job(lambda a: None, argparse.Namespace(overrides=["output.heatmaps=false"], verbose=False), "runs")
    assert [r.getMessage() for r in caplog.records] == [
        "output.heatmaps is a score setting; runs does not use it (ignored here)"]


def test_the_warning_comes_from_the_command_line(tmp_path):
    """patchcore score coreset.ratio=0.01: the warning, then the job (here: stopped by a missing model)."""
    r = subprocess.run([sys.executable, "-m", "patchcore_dist.cli", "score", "--model", str(tmp_path / "none"),
                        "--images", str(tmp_path), "--output", str(tmp_path / "out"), "coreset.ratio=0.01"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "coreset.ratio is a fit setting; score uses the model's (ignored here)" in r.stderr, r.stderr


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
