"""Where the package's installed files are: config/, launch/, rviz/ and the packaged demo model.

Lookup order (first hit wins):
1. `<prefix>/share/r2former_ros` for every prefix of AMENT_PREFIX_PATH (`colcon build` +
   `source install/setup.bash`; the same rule as ament_index's `get_package_share_directory`),
2. `<sys.prefix>/share/r2former_ros` (`pip install .` puts data_files there),
3. the source tree this module was imported from (`pip install -e .`, running from a clone).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

PACKAGE = "r2former_ros"
DEMO_MODEL = "models/r2former_tiny_demo.safetensors"
MODEL_ENV = "R2FORMER_MODEL"
SOURCE_ROOT = Path(__file__).resolve().parents[1]


def share_dirs() -> list[Path]:
    """Candidate roots holding config/, launch/, rviz/, models/, in lookup order (duplicates removed)."""
    roots = [Path(p) / "share" / PACKAGE for p in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep) if p]
    roots += [Path(sys.prefix) / "share" / PACKAGE, SOURCE_ROOT]
    unique: list[Path] = []
    for root in roots:
        if root not in unique:
            unique.append(root)
    return unique


def find_file(relative: str) -> Path:
    """First existing `<root>/<relative>` over `share_dirs()`; FileNotFoundError names every place tried."""
    tried = [root / relative for root in share_dirs()]
    for path in tried:
        if path.is_file():
            return path
    raise FileNotFoundError(f"{relative} not found; looked in: {', '.join(str(p) for p in tried)}")


def default_model_path() -> Path | None:
    """The model used when none is given: $R2FORMER_MODEL, else the packaged demo model; None if neither."""
    env = os.environ.get(MODEL_ENV)
    if env:
        return Path(env).expanduser()
    try:
        return find_file(DEMO_MODEL)
    except FileNotFoundError:
        return None


def resolve_model_path(path: str | os.PathLike | None, what: str = "--model") -> Path:
    """`path` when given (it must exist), else the default model. FileNotFoundError says what to do;
    `what` names the option or parameter the path came from."""
    if path:
        given = Path(path).expanduser()
        if not given.exists():
            raise FileNotFoundError(f"model file {str(given)!r} ({what}) does not exist; leave it empty to use the "
                                    f"packaged demo model {DEMO_MODEL}")
        return given
    found = default_model_path()
    if found is None:
        raise FileNotFoundError(
            f"no model given ({what}) and no default model found ({DEMO_MODEL} in "
            f"{', '.join(str(r) for r in share_dirs())}, or ${MODEL_ENV}): give a checkpoint (the official "
            "CVPR23_DeitS_Rerank.pth, DeiT ImageNet weights or a model trained with `r2former train`), or train "
            "the demo model (docs/TRAINING.md)")
    return found


__all__ = ["DEMO_MODEL", "MODEL_ENV", "PACKAGE", "default_model_path", "find_file", "resolve_model_path",
           "share_dirs"]
