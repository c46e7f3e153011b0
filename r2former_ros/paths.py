"""Where the package's shipped files are: share directory (colcon / pip install) or source tree."""
from __future__ import annotations

import os
import sys
from pathlib import Path

PACKAGE = "r2former_ros"
DEMO_MODEL = "models/r2former_tiny_demo.safetensors"


def share_dirs() -> list[Path]:
    """Candidate roots holding `config/`, `launch/`, `models/`, in lookup order.

    1. the ament index (`colcon build` + `source install/setup.bash`, or AMENT_PREFIX_PATH set),
    2. `<sys.prefix>/share/r2former_ros` (`pip install .` puts data_files there),
    3. the source tree this module was imported from (`pip install -e .`, running from a clone).
    """
    roots: list[Path] = []
    if os.environ.get("AMENT_PREFIX_PATH"):
        try:
            from ament_index_python.packages import get_package_share_directory
            roots.append(Path(get_package_share_directory(PACKAGE)))
        except (ImportError, LookupError, OSError, ValueError):
            pass
    roots.append(Path(sys.prefix) / "share" / PACKAGE)
    roots.append(Path(__file__).resolve().parents[1])
    unique: list[Path] = []
    for root in roots:
        if root not in unique:
            unique.append(root)
    return unique


def find_shared_file(relative: str) -> Path:
    """First existing `<root>/<relative>` over `share_dirs()`; FileNotFoundError names every place tried."""
    tried = [root / relative for root in share_dirs()]
    for path in tried:
        if path.is_file():
            return path
    raise FileNotFoundError(f"{relative} not found; looked in: {', '.join(str(p) for p in tried)}")


def default_model_path() -> Path:
    """The model used when `model_path` is empty: $R2FORMER_MODEL, else the packaged demo model
    (`models/r2former_tiny_demo.safetensors` in the source tree or a share directory)."""
    from r2former_core.model.zoo import default_model_path as core_default_model_path
    found = core_default_model_path()
    if found is not None:
        return found
    try:
        return find_shared_file(DEMO_MODEL)
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"the packaged default model is missing ({exc}). Set the parameter model_path to a model file "
            "(for example `-p model_path:=/path/to/model.safetensors`) or the environment variable "
            "R2FORMER_MODEL, or train the demo model (see docs/TRAINING.md) and place it at "
            "models/r2former_tiny_demo.safetensors") from None


def resolve_model_path(model_path: str) -> Path:
    """`""` -> the packaged default model; otherwise the given path, which must exist."""
    if not model_path:
        return default_model_path()
    path = Path(model_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"model file {str(path)!r} (parameter model_path) does not exist; "
                                "leave model_path empty to use the packaged demo model")
    return path
