"""Paths on the command line are resolved once against the working directory; under `ray job submit`
(its working-dir package is deleted after the job) relative output and model paths are refused."""
from __future__ import annotations

import argparse
import json
import os

import pytest

from patchcore_dist.cli.paths import job_package, resolve_arguments
from patchcore_dist.errors import ConfigError


def _args(**kw):
    return argparse.Namespace(overrides=kw.pop("overrides", []), **kw)


def test_relative_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    a = resolve_arguments(_args(train="data/bottle", model="runs/m", images="./archive", output="out",
                                reuse=None, overrides=["backbone.weights=w/wrn50.pth", "coreset.ratio=0.1",
                                                       "backbone.weights=default"]))
    assert (a.train, a.model, a.images, a.output) == tuple(
        str(tmp_path / p) for p in ("data/bottle", "runs/m", "archive", "out"))
    assert a.reuse is None
    assert a.overrides == [f"backbone.weights={tmp_path / 'w/wrn50.pth'}", "coreset.ratio=0.1",
                           "backbone.weights=default"]


def test_uris_and_absolute_paths_stay(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = resolve_arguments(_args(model="s3://bucket/models/m", output="/abs/out", images="file:///data/x"))
    assert (a.model, a.output, a.images) == ("s3://bucket/models/m", "/abs/out", "file:///data/x")


@pytest.mark.parametrize("option", ["model", "output", "reuse"])
def test_relative_outputs_refused_inside_a_ray_job_package(tmp_path, monkeypatch, option):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip"}}))
    assert job_package() == os.getcwd()
    with pytest.raises(ConfigError, match=f"--{option} runs/x is a relative path.*s3://"):
        resolve_arguments(_args(**{option: "runs/x"}, train="data/t"))
    ok = resolve_arguments(_args(**{option: "/shared/runs/x"}, train="data/t"))
    assert getattr(ok, option) == "/shared/runs/x" and ok.train == str(tmp_path / "data/t")  # inputs resolve inside


def test_job_package_from_the_working_dir_layout(tmp_path, monkeypatch):
    pkg = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    pkg.mkdir(parents=True)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    monkeypatch.chdir(pkg)
    assert job_package() == str(pkg)
    monkeypatch.chdir(tmp_path)
    assert job_package() is None


def test_relative_weights_in_a_config_file_name_a_file_beside_it(tmp_path, monkeypatch):
    from patchcore_dist.config import load_config
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "c.yaml").write_text("backbone:\n  name: resnet18\n  weights: w/resnet18.pth\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config("proj/c.yaml")
    assert cfg.backbone.weights == str(tmp_path / "proj" / "w" / "resnet18.pth")
    assert load_config("proj/c.yaml", ["backbone.weights=random"]).backbone.weights == "random"
