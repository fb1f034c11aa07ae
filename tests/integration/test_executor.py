"""runtime.executor: a small local job runs the same stages in process, without Ray, and gives the same
model and the same score rows and heatmaps as on Ray; the error-row guarantees hold in process too."""
import os

import numpy as np
import pytest

from patchcore_dist.artifacts.model import load_model, read_manifest
from patchcore_dist.artifacts.runs import read_runs
from patchcore_dist.artifacts.scores import read_scores
from patchcore_dist.config import load_config
from patchcore_dist.errors import JobError
from patchcore_dist.pipeline.cluster import use_ray
from patchcore_dist.pipeline.faults import FAULT_ENV
from patchcore_dist.pipeline.fit import run_fit
from patchcore_dist.pipeline.score import run_score

from helpers import SMALL

LOCAL, RAY = SMALL + ["runtime.executor=local"], SMALL + ["runtime.executor=ray"]


def test_auto_runs_in_process_only_without_a_cluster(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv(FAULT_ENV, raising=False)
    monkeypatch.setattr("patchcore_dist.pipeline.cluster.ray_running", lambda: False)
    assert not use_ray(load_config(None, []), 10 ** 7)  # the default: no size makes Ray the choice (no cliff)
    auto = load_config(None, ["runtime.local_max_images=10"])
    assert not use_ray(auto, 10) and use_ray(auto, 11)
    monkeypatch.setattr("patchcore_dist.pipeline.cluster._gpus", lambda device: 2)  # one process drives one GPU
    assert use_ray(load_config(None, []), 1)
    monkeypatch.setattr("patchcore_dist.pipeline.cluster._gpus", lambda device: 1)
    assert not use_ray(load_config(None, []), 1)
    assert use_ray(load_config(None, ["runtime.executor=ray"]), 1)
    assert not use_ray(load_config(None, ["runtime.executor=local"]), 10 ** 6)
    monkeypatch.setattr("patchcore_dist.pipeline.cluster.ray_running", lambda: True)  # reuse a running instance
    assert use_ray(auto, 1)
    monkeypatch.setattr("patchcore_dist.pipeline.cluster.ray_running", lambda: False)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # a cluster was given
    assert use_ray(auto, 1)
    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.setenv(FAULT_ENV, "score:1:/tmp/x")  # an injected fault exits a worker: never this process
    assert use_ray(auto, 1)
    with pytest.raises(JobError, match="fault injection"):
        use_ray(load_config(None, ["runtime.executor=local"]), 1)


@pytest.fixture(scope="module")
def models(ray_local, category, tmp_path_factory):
    """The same model fitted in process and on Ray."""
    root = tmp_path_factory.mktemp("executor")
    out = {}
    for name, over in (("local", LOCAL), ("ray", RAY)):
        out[name] = str(root / name)
        run_fit(category, out[name], load_config(None, over))
    return out


def test_fit_in_process_equals_fit_on_ray(models):
    local, ray = load_model(models["local"]), load_model(models["ray"])
    assert np.array_equal(local.bank, ray.bank)
    assert local.digest == ray.digest  # runtime.executor is not part of the model's identity
    m_local, m_ray = read_manifest(models["local"]), read_manifest(models["ray"])
    assert m_local["config_digest"] == m_ray["config_digest"]
    for m in (m_local, m_ray):
        for timing in ("coreset_seconds", "denoise_seconds"):  # timings
            m["stats"]["coreset"].pop(timing, None)
    assert m_local["stats"] == m_ray["stats"] and m_local["training"] == m_ray["training"]
    assert read_runs(models["local"], {})[-1]["nodes"] == ["local"]
    assert read_runs(models["ray"], {})[-1]["nodes"] not in ([], ["local"])


def test_score_in_process_equals_score_on_ray(models, category, tmp_path):
    images = f"{category}/test"
    tables = {}
    for name, over in (("local", LOCAL), ("ray", RAY)):
        run_score(models["ray"], images, str(tmp_path / name), overrides=over)
        tables[name] = {r["image"]: r for r in read_scores(str(tmp_path / name)).to_pylist()}
    local, ray = tables["local"], tables["ray"]
    n = sum(len(f) for _, _, f in os.walk(images))
    assert len(local) == len(ray) == n and local.keys() == ray.keys()
    for image, r in ray.items():
        l = local[image]
        assert l["error"] is None and r["error"] is None
        assert l["score"] == r["score"]  # the same arithmetic: bit for bit
        assert (l["height"], l["width"], l["digest"]) == (r["height"], r["width"], r["digest"])
        for a, b in ((l["heatmap"], r["heatmap"]), (l["heatmap"][:-4] + "_overlay.jpg", r["heatmap"][:-4] + "_overlay.jpg")):
            with open(a, "rb") as fa, open(b, "rb") as fb:  # heatmap and overlay files, byte for byte
                assert fa.read() == fb.read(), a


def test_in_process_error_rows(models, category, tmp_path, monkeypatch):
    """One row per image in process too: a bad file is an error row, a batch that fails in the scorer
    gives each of its images an error row, and the job still ends with every row written."""
    images = tmp_path / "images"
    images.mkdir()
    good = sorted(os.listdir(f"{category}/test/good"))[:3]
    for name in good:
        (images / name).write_bytes(open(f"{category}/test/good/{name}", "rb").read())
    (images / "broken.png").write_bytes(b"\x89PNG not an image")
    run_score(models["local"], str(images), str(tmp_path / "out"), overrides=LOCAL)
    rows = {os.path.basename(r["image"]): r for r in read_scores(str(tmp_path / "out")).to_pylist()}
    assert len(rows) == 4 and rows["broken.png"]["error"] and rows["broken.png"]["score"] is None
    assert all(rows[n]["error"] is None and rows[n]["score"] is not None for n in good)

    def fail(self, *a, **k):
        raise RuntimeError("injected")
    monkeypatch.setattr("patchcore_dist.core.patchcore.PatchCore.predict", fail)
    run_score(models["local"], str(images), str(tmp_path / "failed"), overrides=LOCAL)
    rows = read_scores(str(tmp_path / "failed")).to_pylist()
    assert len(rows) == 4 and all(r["error"] and r["score"] is None for r in rows)
    assert sum("scoring failed: RuntimeError: injected" in r["error"] for r in rows) == 3
