"""The package as cluster nodes install it: `pip install .` (not editable) into a fresh virtual
environment, then the console scripts run from another directory, without the checkout on the path."""
from __future__ import annotations

import glob
import json
import os
import site
import subprocess
import sys

import pytest

from helpers import ROOT


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh venv holding a regular install of this checkout. Its dependencies come from the test
    environment's site-packages through a .pth line (no second multi-GB torch download); that line
    adds a plain folder, so the test environment's editable install of the checkout is not seen."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    target_site = glob.glob(str(venv / "lib" / "python*" / "site-packages"))[0]
    with open(os.path.join(target_site, "deps.pth"), "w") as f:
        f.write("\n".join(site.getsitepackages()) + "\n")
    build = tmp_path_factory.mktemp("build")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                    "--no-deps", "--no-build-isolation", ROOT], check=True, cwd=build, timeout=600,
                   env={**os.environ, "TMPDIR": str(build)})
    return venv


def _run(venv, args, cwd, timeout=300):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(venv / "bin" / args[0])] + args[1:], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_the_installed_package_is_not_the_checkout(installed, tmp_path):
    r = _run(installed, ["python", "-c", "import patchcore_dist, patchcore_dist.config as c; "
                                         "print(patchcore_dist.__file__); print(c.DEFAULT_CONFIG.exists())"], tmp_path)
    where, default_exists = r.stdout.split()
    assert str(installed) in where and not where.startswith(ROOT), where
    assert default_exists == "True"


def test_console_scripts_help(installed, tmp_path):
    for script in ("patchcore", "patchcore-fit", "patchcore-score", "patchcore-evaluate", "patchcore-maintain",
                   "patchcore-synthesize"):
        r = _run(installed, [script, "--help"], tmp_path, timeout=120)
        assert r.returncode == 0, r.stderr
        assert "usage:" in r.stdout


def test_fit_and_score_with_the_default_config(installed, category, tmp_path):
    model, out = str(tmp_path / "model"), str(tmp_path / "out")
    r = _run(installed, ["patchcore", "fit", "--train", f"{category}/train/good", "--model", model,
                         "runtime.num_actors=1"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = json.load(open(os.path.join(model, "manifest.json")))
    assert manifest["feature_digest"] == "4ad6fd2f72ed6b39"  # the embedded default's features
    r = _run(installed, ["patchcore-score", "--model", model, "--images", f"{category}/test", "--output", out,
                         "output.heatmaps=false", "runtime.num_actors=1"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    from deltalake import DeltaTable  # any Delta reader: the score table is a Delta table
    rows = [r for r in DeltaTable(os.path.join(out, "scores")).to_pyarrow_table().to_pylist()
            if r["model"] == manifest["model_digest"]]
    assert len(rows) == len(glob.glob(f"{category}/test/*/*.png"))
    assert all(r["error"] is None and r["score"] > 0 for r in rows)
