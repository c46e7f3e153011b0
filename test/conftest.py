"""Test set-up: isolated ROS 2 environment, deterministic torch, small shared fixtures."""
from __future__ import annotations

import os
import random
import tempfile

# ROS isolation for every process the tests start (set before anything imports rclpy):
# loopback discovery only, a per-run domain, logs in a temporary directory.
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ.setdefault("ROS_DOMAIN_ID", str(random.SystemRandom().randint(1, 100)))
os.environ["ROS_LOG_DIR"] = tempfile.mkdtemp(prefix="r2former-roslog-")
os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_config():
    """A small model configuration that runs fast on a CPU (random weights)."""
    from r2former_core.model import ModelConfig
    return ModelConfig(image_size=(96, 128), embed_dim=48, depth=3, num_heads=3, global_dim=32, local_dim=16,
                       num_local=24, rerank_dim=16, rerank_heads=4, rerank_depth=2, rerank_pair_depth=2)


@pytest.fixture(scope="session")
def tiny_model(tiny_config):
    from r2former_core.model import build_model
    return build_model(tiny_config, seed=0)


@pytest.fixture(scope="session")
def tf2_msgs_path(tmp_path_factory):
    """Where `tf2_msgs` comes from for the test process and the nodes it starts: None when a ROS 2
    installation provides it, else the site-packages of a tf2_msgs built here from its definition with the
    ROS wheels' message generators (r2former_ros.msg_build, a few seconds). Child processes get it through
    PYTHONPATH (rostools.with_tf2_msgs)."""
    import importlib.util
    import sys
    if importlib.util.find_spec("tf2_msgs") is not None:
        return None
    from r2former_ros.msg_build import build
    path = build(tmp_path_factory.mktemp("tf2_msgs_prefix"))
    sys.path.insert(0, str(path))
    return path

