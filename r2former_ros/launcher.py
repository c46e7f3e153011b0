"""`r2former launch localize`: start the ROS 2 nodes of `launch/localize.launch.py` without `ros2 launch`.

Where `ros2 launch` is not installed (e.g. ROS 2 from pip wheels), this starts the same executables
with the same node names, namespace, parameters files, parameter overrides and remappings, as child
processes:

    r2former launch localize --params-file config/localize.yaml --map maps/demo \\
        [--model M] [--image-topic /camera/image_raw] [--compressed] [--namespace robot1] [--device cpu]
        [--no-autostart] [--use-sim-time] [--lifecycle-manager] [--rviz]

runs  `localize --ros-args -r __node:=r2former_localizer [-r __ns:=/robot1] --params-file ...
       [-r image:=T -r image/compressed:=T/compressed] [-p map_path:=...] [-p autostart:=false]
       [-p use_sim_time:=true]` (plus nav2_lifecycle_manager and rviz2 when asked for and installed).
Ctrl-C is forwarded to every node (SIGINT; SIGTERM after 10 s, then SIGKILL: r2former_ros.processes, the
process control `make demo` uses too). Only processes are spawned here: this module never imports rclpy, so
the `r2former` command line (r2former_core.cli.main) can offer it as its `launch` subcommand.
`localize_invocations` is what the tests compare with the launch file.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from r2former_core.errors import CliError
from r2former_core.options import device_type
from r2former_core.resources import PACKAGE, find_file

from .processes import Child, stop_children


@dataclass(frozen=True)
class LaunchNode:
    """One node of a launch: what `launch_ros.actions.Node(...)` says in the launch file."""
    package: str
    executable: str       # console_script of setup.py (ours), or the other package's executable
    name: str             # node name
    module: str = ""      # `python -m` fallback when the executable is not installed (our nodes)
    params_file: str = ""  # default params file, relative to the package share / source tree


@dataclass
class NodeInvocation:
    """A LaunchNode with the values of one launch: everything that ends up on the command line."""
    node: LaunchNode
    namespace: str
    params_files: list[str] = field(default_factory=list)
    overrides: dict[str, str | bool] = field(default_factory=dict)   # parameter -> value
    remappings: list[tuple[str, str]] = field(default_factory=list)
    arguments: list[str] = field(default_factory=list)                 # before --ros-args

    @property
    def params_file(self) -> str:
        return self.params_files[0] if self.params_files else ""

    def ros_args(self) -> list[str]:
        args = [*self.arguments, "--ros-args", "-r", f"__node:={self.node.name}"]
        if self.namespace:
            args += ["-r", f"__ns:={'/' + self.namespace.strip('/')}"]
        for path in self.params_files:
            args += ["--params-file", path]
        for src, dst in self.remappings:
            args += ["-r", f"{src}:={dst}"]
        for name, value in self.overrides.items():
            args += ["-p", f"{name}:={yaml_value(value)}"]
        return args


LOCALIZER = LaunchNode(PACKAGE, "localize", "r2former_localizer", "r2former_ros.localize_node", "config/localize.yaml")
LIFECYCLE_MANAGER = LaunchNode("nav2_lifecycle_manager", "lifecycle_manager", "lifecycle_manager_localization",
                               params_file="config/lifecycle_manager.yaml")
RVIZ = LaunchNode("rviz2", "rviz2", "rviz2")
NODES: dict[str, list[LaunchNode]] = {"localize": [LOCALIZER]}     # always started; the others on request
RVIZ_CONFIG = "rviz/localize.rviz"


def yaml_string(value: str) -> str:
    """Quote a string parameter value for `-p name:=value` (rcl parses values as YAML: `123` would be an int)."""
    return "'" + str(value).replace("'", "''") + "'"


def yaml_value(value: str | bool) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else yaml_string(value)


def localize_invocations(params_file: str, map_path: str = "", model: str = "", device: str = "",
                         image_topic: str = "", compressed: bool = False, namespace: str = "",
                         odom_topic: str = "", tracking: bool | None = None,
                         autostart: bool = True, use_sim_time: bool = False, lifecycle_manager: bool = False,
                         rviz: bool = False, lifecycle_params_file: str = "",
                         rviz_config: str = "") -> list[NodeInvocation]:
    """The nodes of `localize.launch.py` for these launch arguments (empty = take the params file's value).

    Mirrors the launch file's OpaqueFunction: same nodes, namespace, overrides and remappings.
    """
    overrides: dict[str, str | bool] = {}
    if map_path:
        overrides["map_path"] = map_path
    if model:
        overrides["model_path"] = model
    if device:
        overrides["device"] = device
    if odom_topic:
        overrides["odom_topic"] = odom_topic
    if tracking is not None:
        overrides["tracking"] = tracking
    if compressed:
        overrides["image_transport"] = "compressed"
    if lifecycle_manager or not autostart:
        overrides["autostart"] = False
    if use_sim_time:
        overrides["use_sim_time"] = True
    remappings = [("image", image_topic), ("image/compressed", f"{image_topic}/compressed")] if image_topic else []
    sim: dict[str, str | bool] = {"use_sim_time": True} if use_sim_time else {}
    nodes = [NodeInvocation(LOCALIZER, namespace, [params_file], overrides, remappings)]
    if lifecycle_manager:
        nodes.append(NodeInvocation(LIFECYCLE_MANAGER, namespace, [lifecycle_params_file], dict(sim)))
    if rviz:
        nodes.append(NodeInvocation(RVIZ, namespace, [], dict(sim), list(remappings), ["-d", rviz_config]))
    return nodes


def executable_command(node: LaunchNode) -> list[str]:
    """How to start the node: `<prefix>/lib/<package>/<exe>` (colcon / a ROS install), `<venv>/bin/<exe>` (pip),
    else python -m (our nodes) or PATH (rviz2). CliError when another package's executable is missing."""
    prefixes = [p for p in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep) if p]
    candidates = [Path(p) / "lib" / node.package / node.executable for p in prefixes]
    if node.package == PACKAGE:
        candidates.append(Path(sys.executable).parent / node.executable)
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return [str(path)]
    if node.module:
        return [sys.executable, "-m", node.module]
    found = shutil.which(node.executable) if node.package == "rviz2" else None
    if found:
        return [found]
    raise CliError(f"{node.package} is not installed (no lib/{node.package}/{node.executable} under "
                   "AMENT_PREFIX_PATH): install it with your ROS 2 distribution (e.g. ros-$ROS_DISTRO-"
                   f"{node.package.replace('_', '-')}), or leave out the option that starts it")


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
    p.add_argument("--odom-topic", default="", help="nav_msgs/Odometry topic for the tracker (overrides odom_topic)")
    p.add_argument("--tracking", choices=("on", "off"),
                   help="filter over time (on) or localize single frames (off); overrides tracking")
    p.add_argument("--namespace", default="", help="namespace of the nodes")
    p.add_argument("--rviz", action="store_true", help="also start rviz2 with rviz/localize.rviz")
    p.add_argument("--no-autostart", dest="autostart", action="store_false",
                   help="leave the node unconfigured for a lifecycle manager (parameter autostart false)")
    p.add_argument("--use-sim-time", action="store_true", help="use /clock in every node (use_sim_time true)")
    p.add_argument("--lifecycle-manager", action="store_true",
                   help="also start nav2_lifecycle_manager (config/lifecycle_manager.yaml) to bring the node up; "
                        "needs Nav2 installed")
    p.add_argument("--lifecycle-params-file", help="parameters of the lifecycle manager (default: the package's "
                                                   "config/lifecycle_manager.yaml)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    params_file = args.params_file or str(find_file(NODES[args.name][0].params_file))
    if not Path(params_file).is_file():
        raise CliError(f"parameters file {params_file} does not exist")
    lifecycle_params = ""
    if args.lifecycle_manager:
        lifecycle_params = args.lifecycle_params_file or str(find_file(LIFECYCLE_MANAGER.params_file))
        if not Path(lifecycle_params).is_file():
            raise CliError(f"lifecycle parameters file {lifecycle_params} does not exist")
        lifecycle_params = str(Path(lifecycle_params).resolve())
    invocations = localize_invocations(
        str(Path(params_file).resolve()), map_path=args.map, model=args.model, device=args.device or "",
        image_topic=args.image_topic, compressed=args.compressed, namespace=args.namespace,
        odom_topic=args.odom_topic, tracking=None if args.tracking is None else args.tracking == "on",
        autostart=args.autostart, use_sim_time=args.use_sim_time, lifecycle_manager=args.lifecycle_manager,
        rviz=args.rviz, lifecycle_params_file=lifecycle_params,
        rviz_config=str(find_file(RVIZ_CONFIG)) if args.rviz else "")
    commands = [executable_command(inv.node) + inv.ros_args() for inv in invocations]

    interrupted = False

    def on_signal(signum, frame):  # noqa: ARG001
        nonlocal interrupted
        interrupted = True

    old_int = signal.signal(signal.SIGINT, on_signal)
    old_term = signal.signal(signal.SIGTERM, on_signal)
    children: list[Child] = []
    try:
        for cmd in commands:
            print("starting: " + " ".join(cmd), file=sys.stderr, flush=True)
            # Own session: Ctrl-C reaches the children once, through us; their output stays on our terminal.
            children.append(Child(Path(cmd[0]).name, cmd, log_path=None))
        while not interrupted and all(c.alive() for c in children):
            time.sleep(0.1)
    finally:
        codes = stop_children(children)
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)
    failed = [(cmd[0], code) for cmd, code in zip(commands, codes) if code not in (0, None)]
    for exe, code in failed:
        print(f"r2former launch: {exe} exited with status {code}", file=sys.stderr)
    return failed[0][1] if failed else 0
