"""Shared fixtures: real photographs with injected defects, one local Ray instance, a loopback S3 server."""
from __future__ import annotations

import os
import socket

import pytest
import torch

torch.set_num_threads(2)

# Credentials for the loopback S3 server; set before Ray starts so that workers inherit them.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

from helpers import SIZE  # noqa: E402  (tests/ is on the path: pytest puts conftest's folder there)
from ray_head import use_own_token  # noqa: E402

use_own_token()  # before any Ray starts: never the user's ~/.ray/auth_token


@pytest.fixture(scope="session")
def lite0():
    """The offline EfficientNet-Lite0 feature extractor with real ImageNet weights."""
    from patchcore_dist.core.backbones import build_backbone
    return build_backbone("tf_efficientnet_lite0")


@pytest.fixture(scope="session")
def category(tmp_path_factory):
    """One MVTec-layout category built from scikit-image's brick photograph with injected defects."""
    from patchcore_dist.synthetic.categories import make_demo_benchmark
    root = tmp_path_factory.mktemp("bench")
    make_demo_benchmark(str(root), categories=("brick",), n_images=20, size=SIZE, seed=0)
    return str(root / "brick")


@pytest.fixture(scope="session")
def objects_category(tmp_path_factory):
    from patchcore_dist.synthetic.categories import make_demo_benchmark
    root = tmp_path_factory.mktemp("bench_obj")
    make_demo_benchmark(str(root), categories=("coffee",), n_images=20, size=SIZE, seed=1)
    return str(root / "coffee")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3():
    """A real S3 protocol server on loopback (moto server mode) and its endpoint URL."""
    from moto.server import ThreadedMotoServer
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    yield endpoint
    server.stop()


@pytest.fixture(scope="session")
def bucket(s3):
    import boto3
    client = boto3.client("s3", endpoint_url=s3, region_name="us-east-1")
    client.create_bucket(Bucket="patchcore-test")
    return "patchcore-test"


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole test session: a new instance of our own (address="local",
    never another process's cluster on this machine) in its own temporary folder; others left running."""
    import ray
    from ray_head import init_local_ray, remove_local_temp
    init_local_ray()
    yield ray
    ray.shutdown()
    remove_local_temp()


@pytest.fixture(scope="session")
def small_model(ray_local, category, tmp_path_factory):
    """A model fitted (with the helpers' SMALL settings) on the category's train/good, once per session."""
    from helpers import SMALL
    from patchcore_dist.config import load_config
    from patchcore_dist.pipeline.fit import run_fit
    path = str(tmp_path_factory.mktemp("small_model") / "model")
    run_fit(category, path, load_config(None, SMALL))
    return path
