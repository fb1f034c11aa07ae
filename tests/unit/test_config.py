import pytest

from patchcore_dist.errors import ConfigError
from patchcore_dist.config import load_config


def test_default_and_overrides():
    c = load_config(None, ["coreset.ratio=0.01", "backbone.weights=/models/wrn50.pth", "backbone.layers=[a, b]"])
    assert c.backbone.name == "tf_efficientnet_lite0"
    assert c.coreset.ratio == 0.01 and c.backbone.weights == "/models/wrn50.pth" and c.backbone.layers == ["a", "b"]


def test_another_backbone_on_the_command_line_gets_its_own_levels():
    from patchcore_dist.core.backbones import build_backbone
    c = load_config(None, ["backbone.name=resnet18", "backbone.weights=random"])
    assert c.backbone.layers is None  # not Lite0's blocks.2 / blocks.4 from the default file
    assert build_backbone(c.backbone.name, c.backbone.layers, c.backbone.weights).layers == ("layer2", "layer3")
    both = load_config(None, ["backbone.name=resnet18", "backbone.layers=[layer1, layer2]"])
    assert both.backbone.layers == ["layer1", "layer2"]
    same = load_config(None, ["backbone.name=tf_efficientnet_lite0"])
    assert same.backbone.layers == ["blocks.2", "blocks.4"]


def test_wrn50_config_is_the_seed_setting():
    c = load_config("configs/wrn50.yaml")
    assert c.backbone.name == "wide_resnet50_2" and c.backbone.layers == ["layer2", "layer3"]
    assert (c.embedding.pretrain_dim, c.embedding.target_dim, c.coreset.ratio) == (1024, 1024, 0.1)
    assert (c.image.resize, c.image.crop) == (256, 224)


@pytest.mark.parametrize("override, message", [
    ("coreset.ratoi=0.1", "coreset.ratoi: unknown key"),
    ("coreset.ratio=abc", "coreset.ratio"),
    ("coreset.ratio=0", "greater than 0"),
    ("image.crop=300", "must not exceed image.resize"),
    ("embedding.patch_size=4", "odd"),
    ("nosuchsection.x=1", "nosuchsection: unknown key"),
    ("seed", "key=value"),
])
def test_bad_values_are_one_clear_error(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)


def test_actor_pool_takes_the_batch_size_of_its_device(monkeypatch):
    """GPU actors batch runtime.gpu_batch_size images, CPU actors runtime.batch_size (cluster faked)."""
    import ray
    from patchcore_dist.pipeline.cluster import actor_pool
    cfg = load_config(None, ["runtime.batch_size=4", "runtime.gpu_batch_size=96"])
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": 2.0})
    gpu = actor_pool(cfg)
    assert gpu["batch_size"] == 96 and gpu["num_gpus"] == 1 and gpu["compute"].max_size == 2
    assert actor_pool(load_config(None, ["runtime.device=cpu", "runtime.batch_size=4"]))["batch_size"] == 4
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})
    cpu = actor_pool(cfg)
    assert cpu["batch_size"] == 4 and "num_gpus" not in cpu
    with pytest.raises(RuntimeError, match="no GPUs"):
        actor_pool(load_config(None, ["runtime.device=cuda"]))


@pytest.mark.parametrize("overrides, message", [
    (["seed=-1"], "seed: Input should be greater than or equal to 0"),
    (["seed=100000000000000000000000"], "seed: Input should be less than or equal to"),
    (["scoring.sigma=.inf"], "scoring.sigma: Input should be a finite number"),
    (["scoring.sigma=1e9"], r"scoring.sigma \(1000000000.0\) is larger than the anomaly map"),
    (["coreset.oversample=.inf"], "coreset.oversample: Input should be a finite number"),
    (["coreset.oversample=1000"], "coreset.oversample: Input should be less than or equal to 100"),
    (["index.pq_m=7"], r"index.pq_m \(7\) must divide embedding.target_dim \(1024\)"),
    (["index.type=ivf_pq", "index.pq_m=7"], "must divide"),
    (["index.hnsw_m=100000"], "index.hnsw_m: Input should be less than or equal to 256"),
    (["image.resize=1000000"], "image.resize: Input should be less than or equal to 4096"),
    (["image.max_pixels=10000000000"], "image.max_pixels: Input should be less than or equal to"),
    (["image.max_bytes=0"], "image.max_bytes: Input should be greater than 0"),
    (["coreset.size=1000000000"], "larger than any realistic memory bank"),
    (["runtime.batch_size=true"], "runtime.batch_size: Input should be a valid integer"),
    (["runtime.batch_size=2.5"], "runtime.batch_size: Input should be a valid integer"),
    (["runtime.actor_cpus=true"], "runtime.actor_cpus: a boolean is not a number"),
    (["runtime.actor_cpus=5", "runtime.ray_num_cpus=2"], "exceeds runtime.ray_num_cpus"),
    (["output.patch_scores=3"], "output.patch_scores"),
    (["storage.endpoint_url=ftp://host"], "http:// or https://"),
])
def test_values_that_would_fail_later_are_refused_at_load(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_numbers_in_yaml_spellings_are_still_read():
    c = load_config(None, ["coreset.ratio=1e-3", "runtime.actor_cpus=2", "scoring.sigma=0"])
    assert c.coreset.ratio == 0.001 and c.runtime.actor_cpus == 2.0 and c.scoring.sigma == 0.0


def test_credentials_in_the_endpoint_are_refused_and_not_echoed(tmp_path):
    secret = "wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY"
    with pytest.raises(ConfigError, match="must not contain credentials") as e:
        load_config(None, [f"storage.endpoint_url=http://AKIAEXAMPLE:{secret}@127.0.0.1:9000"])
    assert secret not in str(e.value)
    p = tmp_path / "c.yaml"
    p.write_text(f"storage:\n  endpoint_url: https://u:{secret}@minio.example\n")
    with pytest.raises(ConfigError, match="must not contain credentials") as e:
        load_config(p)
    assert secret not in str(e.value)


def test_actor_cpus_above_the_cluster_is_refused_where_the_pool_is_made(monkeypatch):
    import ray
    from patchcore_dist.errors import JobError
    from patchcore_dist.pipeline.cluster import actor_pool
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})
    assert actor_pool(load_config(None, ["runtime.actor_cpus=4"]))["num_cpus"] == 4.0
    with pytest.raises(JobError, match=r"runtime.actor_cpus=6.0 but the Ray cluster has 4 CPUs"):
        actor_pool(load_config(None, ["runtime.actor_cpus=6"]))


def test_run_placement_keys_leave_the_model_identity_alone():
    """runtime.executor, runtime.local_max_images and storage.shared_paths are not recorded in a model's
    config.yaml nor in its config digest: the same model in process or on Ray, on any cluster."""
    from patchcore_dist.artifacts.model import config_yaml
    base = load_config()
    other = load_config(None, ["runtime.executor=ray", "runtime.local_max_images=3", "storage.shared_paths=[/mnt/nfs]"])
    assert base.recorded_dict() == other.recorded_dict() and config_yaml(base) == config_yaml(other)
    assert "executor" not in base.recorded_dict()["runtime"] and "shared_paths" not in base.recorded_dict()["storage"]


def test_shared_paths_and_executor_are_checked():
    assert load_config(None, ["storage.shared_paths=[file:///mnt/nfs/]"]).storage.shared_paths == ["/mnt/nfs"]
    for bad in ("[relative/dir]", "[s3://bucket/x]", "[/]"):
        with pytest.raises(ConfigError, match="shared_paths"):
            load_config(None, [f"storage.shared_paths={bad}"])
    with pytest.raises(ConfigError, match="executor"):
        load_config(None, ["runtime.executor=threads"])
    with pytest.raises(ConfigError, match="local_max_images"):
        load_config(None, ["runtime.local_max_images=-1"])


def test_local_paths_are_refused_on_a_multi_node_cluster(monkeypatch, tmp_path):
    from patchcore_dist.errors import JobError
    from patchcore_dist.pipeline import cluster

    class TwoNodes:
        @staticmethod
        def nodes():
            return [{"Alive": True}, {"Alive": True}, {"Alive": False}]
    monkeypatch.setattr(cluster, "ray_running", lambda: True)
    monkeypatch.setattr(cluster, "init_ray", lambda config: TwoNodes)
    paths = {"--model": "s3://b/m", "--output": str(tmp_path / "out")}
    with pytest.raises(JobError, match=r"2 nodes.*--output .*out.*storage.shared_paths"):
        cluster.check_cluster_paths(load_config(), paths)
    cluster.check_cluster_paths(load_config(None, [f"storage.shared_paths=[{tmp_path}]"]), paths)
    cluster.check_cluster_paths(load_config(None, ["runtime.executor=local"]), paths)  # the driver does it all
    monkeypatch.setattr(cluster, "ray_running", lambda: False)
    cluster.check_cluster_paths(load_config(), paths)  # no cluster given: a local instance has one node
