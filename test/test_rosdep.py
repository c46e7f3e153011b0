"""package.xml declares what the code imports, with rosdep keys that exist.

Keys are checked against the keys this project documents: the rosdistro keys listed in
docs/INSTALL.md (verified in ros/rosdistro rosdep/python.yaml) and the keys of the project's own
rosdep file config/rosdep.yaml. The imports of every module of the installed packages and the
launch file are scanned: each ROS package and each third-party Python package must be declared.
`rosdep install` itself cannot run here (no rosdep database on this machine).
"""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [*sorted((ROOT / "r2former_core").rglob("*.py")), *sorted((ROOT / "r2former_ros").rglob("*.py")),
           *sorted((ROOT / "launch").glob("*.launch.py"))]
# Modules that build tf2_msgs where the distribution's package is missing (ROS 2 from pip wheels); on a
# ROS installation tf2_msgs itself is declared and this tool is not used, so its imports of the message
# generators (part of every ROS 2 installation's ros_core) are not runtime dependencies.
PIP_ONLY_MODULES = {"r2former_ros/msg_build.py"}
# Import name -> what provides it: a ROS package name or a rosdep key.
PYTHON_KEYS = {"numpy": "python3-numpy", "cv2": "python3-opencv", "yaml": "python3-yaml", "tqdm": "python3-tqdm",
               "matplotlib": "python3-matplotlib", "timm": "python3-timm-pip", "torch": "python3-torch-pip",
               "faiss": "python3-faiss-cpu-pip", "safetensors": "python3-safetensors-pip",
               "rosbags": "python3-rosbags-pip",
               "apsw": "python3-rosbags-pip"}   # rosbags' SQLite binding (its dependency): bag read errors
ROS_MODULE = re.compile(r"^(rclpy|launch|launch_ros|ament_index_python|tf2_ros|tf2_msgs|rcl_interfaces|"
                        r"builtin_interfaces|std_srvs|rosidl_\w+|\w+_msgs)$")
DEPRECATED_KEYS = {"python3-pytorch-pip", "python3-faiss-pip"}   # end-of-life alias / never existed


def package():
    from catkin_pkg.package import parse_package
    return parse_package(str(ROOT / "package.xml"))


def documented_rosdistro_keys() -> set[str]:
    """The rosdistro keys docs/INSTALL.md lists as verified (a table row per key: | `key` | ... |)."""
    text = (ROOT / "docs" / "INSTALL.md").read_text()
    section = text.split("<!-- rosdistro-keys -->")[1].split("<!-- /rosdistro-keys -->")[0]
    return set(re.findall(r"^\|\s*`([\w.-]+)`", section, flags=re.M))


def local_keys() -> dict:
    return yaml.safe_load((ROOT / "config" / "rosdep.yaml").read_text())


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_package_xml_is_valid_format_3_ament_python():
    pkg = package()
    pkg.validate()
    assert pkg.package_format == 3 and pkg.name == "r2former_ros"
    assert pkg.get_build_type() == "ament_python"


def test_every_key_is_a_ros_package_or_a_documented_rosdep_key():
    pkg = package()
    documented = documented_rosdistro_keys()
    local = local_keys()
    assert documented and local
    assert not (documented & set(local)), "a local key shadows a rosdistro key"
    for dep in pkg.exec_depends + pkg.test_depends + pkg.buildtool_depends:
        assert dep.name not in DEPRECATED_KEYS, dep.name
        if dep.name.startswith("python3-"):
            assert dep.name in documented or dep.name in local, f"{dep.name}: no rosdistro or local rosdep key"
        else:
            assert re.fullmatch(r"[a-z][a-z0-9_]*", dep.name), dep.name    # a ROS package name
    # every local key installs a package pinned in requirements.txt (same name), on Debian and Ubuntu
    requirements = {re.split(r"[=<>]", line)[0].strip().lower()
                    for line in (ROOT / "requirements.txt").read_text().splitlines()
                    if line.strip() and not line.startswith("#")}
    for key, rules in local.items():
        for platform in ("debian", "ubuntu"):
            packages = rules[platform]["pip"]["packages"]
            assert all(p.lower() in requirements for p in packages), (key, packages)


def test_every_import_is_declared():
    declared = {d.name for d in package().exec_depends}
    stdlib = set(sys.stdlib_module_names) | {"r2former_core", "r2former_ros", "__future__"}
    missing = []
    for path in SOURCES:
        rel = path.relative_to(ROOT).as_posix()
        for name in imports(path) - stdlib:
            if ROS_MODULE.match(name):
                if rel in PIP_ONLY_MODULES and name.startswith("rosidl_"):
                    continue
                if name not in declared:
                    missing.append((rel, name))
            elif name in PYTHON_KEYS:
                if PYTHON_KEYS[name] not in declared:
                    missing.append((rel, PYTHON_KEYS[name]))
            else:
                missing.append((rel, f"{name} (unknown: add it to PYTHON_KEYS with its rosdep key)"))
    assert not missing, missing


def test_requirements_cover_the_local_keys_and_gpu_file_swaps_faiss():
    req = (ROOT / "requirements.txt").read_text()
    gpu = (ROOT / "requirements-gpu.txt").read_text()
    assert "faiss-cpu" in req
    lines = [ln.strip() for ln in gpu.splitlines() if ln.strip() and not ln.startswith("#")]
    assert any(ln.startswith("faiss-gpu") for ln in lines) and not any(ln.startswith("faiss-cpu") for ln in lines)
    assert not any(ln.startswith("-r") for ln in lines), "requirements-gpu.txt must not pull in faiss-cpu"


def test_setup_py_follows_the_ament_python_template():
    tree = ast.parse((ROOT / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    kw = {k.arg: k.value for k in call.keywords}
    assert ast.literal_eval(kw["install_requires"]) == ["setuptools"]
    assert ast.literal_eval(kw["extras_require"]) == {"test": ["pytest"]}


@pytest.mark.parametrize("key", ["python3-torch-pip", "python3-faiss-cpu-pip"])
def test_install_doc_shows_how_to_register_the_local_rosdep_file(key):
    text = (ROOT / "docs" / "INSTALL.md").read_text()
    assert "config/rosdep.yaml" in text and "sources.list.d" in text and "rosdep install" in text
    assert key in (ROOT / "config" / "rosdep.yaml").read_text()
