"""`r2former launch localize`: start the ROS 2 nodes of `launch/localize.launch.py` without `ros2 launch`.

Where `ros2 launch` is not installed (e.g. ROS 2 from pip wheels), this starts the same executables
with the same node names, parameters file, parameter overrides and remappings, as child processes:

    r2former launch localize --params-file config/localize.yaml --map maps/demo \\
        [--model M] [--image-topic /camera/image_raw] [--compressed] [--namespace robot1] [--device cpu] [--rviz]

runs  `localize --ros-args -r __node:=r2former_localizer [-r __ns:=/robot1] --params-file ...
       [-r image:=T -r image/compressed:=T/compressed] [-p map_path:=...]`.
Ctrl-C is forwarded to every node (SIGINT; SIGTERM after 10 s). Only processes are spawned here:
r2former_core never imports rclpy. `NODES` is the table the tests compare with the launch file.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from ..errors import CliError
from ..options import device_type
from ..resources import PACKAGE, find_file

STOP_TIMEOUT_SEC = 10.0


@dataclass(frozen=True)
class LaunchNode:
    """One node of a launch: what `launch_ros.actions.Node(...)` says in the launch file."""
    package: str
    executable: str       # console_script of setup.py
    name: str             # node name = top-level key of the params file
    module: str           # `python -m` fallback when the executable is not installed
    params_file: str      # default params file, relative to the package share / source tree


@dataclass
class NodeInvocation:
    """A LaunchNode with the values of one launch: everything that ends up on the command line."""
    node: LaunchNode
    namespace: str
    params_file: str
    overrides: dict[str, str] = field(default_factory=dict)       # parameter -> value (strings)
    remappings: list[tuple[str, str]] = field(default_factory=list)

    def ros_args(self) -> list[str]:
        args = ["--ros-args", "-r", f"__node:={self.node.name}"]
        if self.namespace:
            args += ["-r", f"__ns:={'/' + self.namespace.strip('/')}"]
        args += ["--params-file", self.params_file]
        for src, dst in self.remappings:
            args += ["-r", f"{src}:={dst}"]
        for name, value in self.overrides.items():
            args += ["-p", f"{name}:={yaml_string(value)}"]
        return args


LOCALIZER = LaunchNode(PACKAGE, "localize", "r2former_localizer", "r2former_ros.localize_node", "config/localize.yaml")
NODES: dict[str, list[LaunchNode]] = {"localize": [LOCALIZER]}
RVIZ_CONFIG = "rviz/localize.rviz"


def yaml_string(value: str) -> str:
    """Quote a string parameter value for `-p name:=value` (rcl parses values as YAML: `123` would be an int)."""
    return "'" + str(value).replace("'", "''") + "'"


def localize_invocations(params_file: str, map_path: str = "", model: str = "", device: str = "",
                         image_topic: str = "", compressed: bool = False, namespace: str = "") -> list[NodeInvocation]:
    """The nodes of `localize.launch.py` for these launch arguments (empty = take the params file's value).

    Mirrors the launch file's OpaqueFunction: same overrides, same remappings.
    """
    overrides: dict[str, str] = {}
    if map_path:
        overrides["map_path"] = map_path
    if model:
        overrides["model_path"] = model
    if device:
        overrides["device"] = device
    if compressed:
        overrides["image_transport"] = "compressed"
    remappings = [("image", image_topic), ("image/compressed", f"{image_topic}/compressed")] if image_topic else []
    return [NodeInvocation(LOCALIZER, namespace, params_file, overrides, remappings)]


def executable_command(node: LaunchNode) -> list[str]:
    """How to start the node: `<prefix>/lib/<package>/<exe>` (colcon), `<venv>/bin/<exe>` (pip), else python -m."""
    prefixes = [p for p in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep) if p]
    candidates = [Path(p) / "lib" / node.package / node.executable for p in prefixes]
    candidates.append(Path(sys.executable).parent / node.executable)
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return [str(path)]
    return [sys.executable, "-m", node.module]


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "launch", help="start the ROS 2 nodes of a launch file (without ros2 launch)",
        description="Start the nodes of launch/<NAME>.launch.py as child processes with the same executables, "
                    "node names, parameters and remappings; Ctrl-C stops them all. Needs a ROS 2 installation "
                    "(rclpy) for the nodes themselves.")
    p.add_argument("name", choices=sorted(NODES), help="which launch (localize)")
    p.add_argument("--params-file", help="parameters file (default: the package's config/localize.yaml)")
    p.add_argument("--map", default="", help="map directory (overrides map_path)")
    p.add_argument("--model", default="", help="model file (overrides model_path)")
    p.add_argument("--device", type=device_type, help="overrides device (auto, cpu, cuda or cuda:N)")
    p.add_argument("--image-topic", default="", help="camera topic to remap `image` to (and <topic>/compressed)")
    p.add_argument("--compressed", action="store_true", help="subscribe <image-topic>/compressed")
    p.add_argument("--namespace", default="", help="namespace of the nodes")
    p.add_argument("--rviz", action="store_true", help="also start rviz2 with rviz/localize.rviz")
    p.set_defaults(func=run)
    return p


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + STOP_TIMEOUT_SEC
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(5.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def run(args: argparse.Namespace) -> int:
    params_file = args.params_file or str(find_file(NODES[args.name][0].params_file))
    if not Path(params_file).is_file():
        raise CliError(f"parameters file {params_file} does not exist")
    invocations = localize_invocations(str(Path(params_file).resolve()), map_path=args.map, model=args.model,
                                       device=args.device or "", image_topic=args.image_topic,
                                       compressed=args.compressed, namespace=args.namespace)
    commands = [executable_command(inv.node) + inv.ros_args() for inv in invocations]
    if args.rviz:
        rviz = shutil.which("rviz2")
        if rviz is None:
            raise CliError("--rviz: rviz2 is not installed (not on PATH)")
        commands.append([rviz, "-d", str(find_file(RVIZ_CONFIG))])

    interrupted = False

    def on_signal(signum, frame):  # noqa: ARG001
        nonlocal interrupted
        interrupted = True

    old_int = signal.signal(signal.SIGINT, on_signal)
    old_term = signal.signal(signal.SIGTERM, on_signal)
    procs: list[subprocess.Popen] = []
    try:
        for cmd in commands:
            print("starting: " + " ".join(cmd), file=sys.stderr, flush=True)
            # Own session: Ctrl-C reaches the children once, through us.
            procs.append(subprocess.Popen(cmd, start_new_session=True))
        while not interrupted and all(p.poll() is None for p in procs):
            time.sleep(0.1)
    finally:
        _stop(procs)
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)
    codes = [p.returncode for p in procs]
    failed = [(cmd[0], code) for cmd, code in zip(commands, codes) if code not in (0, None)]
    for exe, code in failed:
        print(f"r2former launch: {exe} exited with status {code}", file=sys.stderr)
    return failed[0][1] if failed else 0
