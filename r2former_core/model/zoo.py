"""Where models live: the project's own demo model and the user's checkpoints."""
from __future__ import annotations

import os
import sys
from pathlib import Path

DEMO_MODEL_NAME = "r2former_tiny_demo.safetensors"
MODEL_ENV = "R2FORMER_MODEL"


def default_model_path() -> Path | None:
    """The model used when none is given: $R2FORMER_MODEL, else the packaged demo model.

    Looks in the source tree (`models/`), then in `<prefix>/share/r2former_ros/models/` of the
    install prefixes (colcon/ament or pip data files). Returns None when there is none.
    """
    env = os.environ.get(MODEL_ENV)
    if env:
        return Path(env)
    candidates = [Path(__file__).resolve().parents[2] / "models" / DEMO_MODEL_NAME,
                  Path(sys.prefix) / "share" / "r2former_ros" / "models" / DEMO_MODEL_NAME]
    for prefix in filter(None, os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep)):
        candidates.append(Path(prefix) / "share" / "r2former_ros" / "models" / DEMO_MODEL_NAME)
    return next((c for c in candidates if c.is_file()), None)


def resolve_model_path(path: str | os.PathLike | None) -> Path:
    """`path` if given, else the default model; FileNotFoundError with what to do otherwise."""
    if path:
        return Path(path)
    found = default_model_path()
    if found is None:
        raise FileNotFoundError(
            f"no model given and no default model found (models/{DEMO_MODEL_NAME} or ${MODEL_ENV}): pass --model "
            "with a checkpoint (official CVPR23_DeitS_Rerank.pth, DeiT ImageNet weights or a model trained with "
            "`r2former train`)")
    return found
