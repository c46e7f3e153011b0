"""The launch file, the `r2former launch` CLI, setup.py, the YAML files and the nodes stay in step.

`launch`/`launch_ros` are not installable here (SETUP.md §3, §6): the launch file is imported with
recording stubs of those modules, and its nodes are compared with the CLI's node table. The CLI
is also run end to end (it starts the same executable), with the default best-effort QoS and the
compressed transport. `ros2 launch` itself was never executed here.
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import yaml
from rostools import RosProbe, build_test_map, line_poses, save_tiny_model, synthetic_images

pytestmark = pytest.mark.ros

from r2former_ros import (  # noqa: E402
    build_map_node,
    launcher,  # noqa: E402
    localize_node,
)

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_FILE = ROOT / "launch" / "localize.launch.py"
SHARE = "/fake/share/r2former_ros"


# ------------------------------------------------------------------------------ launch stubs

class Recorded:
    def __init__(self, *args, **kwargs):
        self.args = args
        self.kwargs = kwargs


class LaunchConfiguration(Recorded):
    @property
    def name(self):
        return self.args[0]


class PathJoinSubstitution(Recorded):
    pass


class FindPackageShare(Recorded):
    pass


class ParameterValue(Recorded):
    pass


class OpaqueFunction(Recorded):
    pass


class DeclareLaunchArgument(Recorded):
    pass


class Node(Recorded):
    pass


class IfCondition(Recorded):
    pass


class LaunchDescription(Recorded):
    @property
    def entities(self):
        return list(self.args[0])


def resolve(value, context):
    """Evaluate the recorded substitutions the way launch would."""
    if isinstance(value, str):
        return value
    if isinstance(value, LaunchConfiguration):
        return context.launch_configurations[value.name]
    if isinstance(value, FindPackageShare):
        assert value.args == ("r2former_ros",)
        return SHARE
    if isinstance(value, PathJoinSubstitution):
        return "/".join(resolve(v, context) for v in value.args[0])
    if isinstance(value, ParameterValue):
        assert value.kwargs.get("value_type") is str, "string parameters from launch arguments must be typed"
        return resolve(value.args[0], context)
    if isinstance(value, list):
        return "".join(resolve(v, context) for v in value)
    raise AssertionError(f"unexpected substitution {value!r}")


@pytest.fixture
def launch_module(monkeypatch):
    def module(name, **attrs):
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, m)
        return m
    module("launch", LaunchDescription=LaunchDescription)
    module("launch.actions", DeclareLaunchArgument=DeclareLaunchArgument, OpaqueFunction=OpaqueFunction)
    module("launch.substitutions", LaunchConfiguration=LaunchConfiguration, PathJoinSubstitution=PathJoinSubstitution)
    module("launch.conditions", IfCondition=IfCondition)
    module("launch_ros")
    module("launch_ros.actions", Node=Node)
    module("launch_ros.parameter_descriptions", ParameterValue=ParameterValue)
    module("launch_ros.substitutions", FindPackageShare=FindPackageShare)
    spec = importlib.util.spec_from_file_location("localize_launch", LAUNCH_FILE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def launch_nodes(launch_module, **arguments):
    """Nodes of the launch description for these launch arguments (others at their defaults)."""
    ld = launch_module.generate_launch_description()
    declared = {e.args[0]: e for e in ld.entities if isinstance(e, DeclareLaunchArgument)}
    unknown = set(arguments) - set(declared)
    assert not unknown, f"not launch arguments: {unknown}"
    context = types.SimpleNamespace(launch_configurations={})
    for name, arg in declared.items():
        context.launch_configurations[name] = resolve(arg.kwargs["default_value"], context)
    context.launch_configurations.update(arguments)
    nodes = []
    for e in ld.entities:
        if isinstance(e, OpaqueFunction):
            nodes += e.kwargs["function"](context)
        elif isinstance(e, Node):
            nodes.append(e)
    return nodes, declared, context


def console_scripts() -> dict[str, str]:
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            for k, v in zip(node.keys, node.values):
                if isinstance(k, ast.Constant) and k.value == "console_scripts":
                    entries = [ast.literal_eval(e) for e in v.elts]
                    return dict(re.fullmatch(r"\s*(\S+)\s*=\s*(\S+)\s*", e).groups() for e in entries)
    raise AssertionError("no console_scripts in setup.py")


# ------------------------------------------------------------------------------ tests: in step

SCENARIOS = [
    {},
    {"map": "/maps/123", "model": "/models/m.safetensors", "device": "cpu"},
    {"map": "maps/a b", "image_topic": "/camera/image_raw", "compressed": "true", "namespace": "robot1"},
    {"autostart": "false", "use_sim_time": "true", "odom_topic": "/wheel/odom", "tracking": "false"},
    {"tracking": "true", "odom_topic": "odom"},
    {"lifecycle_manager": "true", "namespace": "robot2", "rviz": "true", "use_sim_time": "true",
     "image_topic": "/robot2/camera/image_raw"},
]
LIFECYCLE_PARAMS = f"{SHARE}/config/lifecycle_manager.yaml"


def flag(arguments, name, default="false"):
    return arguments.get(name, default) == "true"


@pytest.mark.parametrize("arguments", SCENARIOS)
def test_launch_file_nodes_equal_cli_invocations(launch_module, arguments):
    nodes, declared, context = launch_nodes(launch_module, **arguments)
    invocations = launcher.localize_invocations(
        params_file=f"{SHARE}/config/localize.yaml", map_path=arguments.get("map", ""),
        model=arguments.get("model", ""), device=arguments.get("device", ""),
        image_topic=arguments.get("image_topic", ""), compressed=flag(arguments, "compressed"),
        odom_topic=arguments.get("odom_topic", ""),
        tracking=None if "tracking" not in arguments else flag(arguments, "tracking"),
        namespace=arguments.get("namespace", ""), autostart=flag(arguments, "autostart", "true"),
        use_sim_time=flag(arguments, "use_sim_time"), lifecycle_manager=flag(arguments, "lifecycle_manager"),
        rviz=flag(arguments, "rviz"), lifecycle_params_file=LIFECYCLE_PARAMS,
        rviz_config=f"{SHARE}/{launcher.RVIZ_CONFIG}")
    assert [(n.kwargs["package"], n.kwargs["executable"], n.kwargs["name"]) for n in nodes] == [
        (inv.node.package, inv.node.executable, inv.node.name) for inv in invocations]
    for node, inv in zip(nodes, invocations):
        kw = node.kwargs
        assert resolve(kw.get("namespace", ""), context) == inv.namespace
        params = kw.get("parameters", [])
        files = [resolve(p, context) for p in params if not isinstance(p, dict)]
        assert files == inv.params_files
        overrides = {k: v if isinstance(v, bool) else resolve(v, context) for p in params if isinstance(p, dict)
                     for k, v in p.items()}
        assert overrides == inv.overrides
        assert [tuple(resolve(x, context) for x in r) for r in kw.get("remappings", [])] == inv.remappings
        assert [resolve(a, context) for a in kw.get("arguments", [])] == inv.arguments
    localizer = invocations[0]
    if flag(arguments, "lifecycle_manager") or not flag(arguments, "autostart", "true"):
        assert localizer.overrides["autostart"] is False     # a manager brings it up
    if flag(arguments, "use_sim_time"):
        assert all(inv.overrides.get("use_sim_time") is True for inv in invocations)
    if flag(arguments, "rviz"):                              # RViz in the same namespace, same camera remap
        rviz = invocations[-1]
        assert rviz.namespace == localizer.namespace and rviz.remappings == localizer.remappings


def test_cli_command_line_carries_the_same_values():
    inv = launcher.localize_invocations("/p/localize.yaml", map_path="123", image_topic="/cam",
                                          compressed=True, namespace="r1", autostart=False, use_sim_time=True,
                                          odom_topic="/odom", tracking=False)[0]
    args = inv.ros_args()
    assert args[:3] == ["--ros-args", "-r", "__node:=r2former_localizer"]
    assert ["-r", "__ns:=/r1"] == args[3:5] and ["--params-file", "/p/localize.yaml"] == args[5:7]
    assert "image:=/cam" in args and "image/compressed:=/cam/compressed" in args
    assert "map_path:='123'" in args            # quoted: rcl would parse 123 as an integer
    assert "image_transport:='compressed'" in args
    assert "autostart:=false" in args and "use_sim_time:=true" in args   # booleans stay booleans
    assert "odom_topic:='/odom'" in args and "tracking:=false" in args


def test_cli_refuses_nodes_that_are_not_installed(monkeypatch, tmp_path):
    monkeypatch.setenv("AMENT_PREFIX_PATH", str(tmp_path))
    with pytest.raises(launcher.CliError, match="nav2_lifecycle_manager is not installed"):
        launcher.executable_command(launcher.LIFECYCLE_MANAGER)
    (tmp_path / "lib" / "nav2_lifecycle_manager").mkdir(parents=True)
    exe = tmp_path / "lib" / "nav2_lifecycle_manager" / "lifecycle_manager"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    assert launcher.executable_command(launcher.LIFECYCLE_MANAGER) == [str(exe)]


def test_launch_arguments_rviz_and_files(launch_module):
    nodes, declared, context = launch_nodes(launch_module)
    assert set(declared) == {"map", "model", "device", "image_topic", "compressed", "namespace", "rviz",
                             "params_file", "autostart", "use_sim_time", "lifecycle_manager",
                             "lifecycle_params_file", "odom_topic", "tracking"}
    assert all(arg.kwargs.get("description") for arg in declared.values())
    assert [n.kwargs["package"] for n in nodes] == ["r2former_ros"]      # rviz2 is not looked up unless asked
    assert declared["rviz"].kwargs["default_value"] == "false"
    assert declared["autostart"].kwargs["default_value"] == "true"
    assert resolve(declared["lifecycle_params_file"].kwargs["default_value"], context) == LIFECYCLE_PARAMS
    assert (ROOT / launcher.RVIZ_CONFIG).is_file() and (ROOT / launcher.LIFECYCLE_MANAGER.params_file).is_file()
    nodes, _, context = launch_nodes(launch_module, rviz="true")
    config = resolve(nodes[-1].kwargs["arguments"][1], context)
    assert config == f"{SHARE}/{launcher.RVIZ_CONFIG}"
    # the CLI offers every launch argument as an option
    import argparse
    sub = argparse.ArgumentParser().add_subparsers()
    dests = {a.dest for a in launcher.add_parser(sub)._actions}
    assert {"map", "model", "device", "image_topic", "compressed", "namespace", "rviz", "params_file", "autostart",
            "use_sim_time", "lifecycle_manager", "lifecycle_params_file", "odom_topic", "tracking"} <= dests


def test_rviz_topics_are_relative_and_exist():
    """RViz follows the namespace: its topics are relative names of topics the node uses."""
    text = (ROOT / launcher.RVIZ_CONFIG).read_text()
    topics = re.findall(r"Topic:\s*\n\s*Value: (\S+)", text)
    assert topics and not any(t.startswith("/") for t in topics), topics
    node_topics = {"image", "initialpose"} | {f"r2former_localizer/{t}" for t in ("matches", "map_poses",
                                                                                   "candidates", "pose")}
    assert set(topics) <= node_topics


def test_lifecycle_manager_config_manages_the_localizer():
    doc = yaml.safe_load((ROOT / launcher.LIFECYCLE_MANAGER.params_file).read_text())
    params = doc["/**"]["ros__parameters"]
    assert params["node_names"] == [launcher.LOCALIZER.name] and params["autostart"] is True
    assert params["bond_timeout"] == 0.0          # the rclpy node has no bond


def test_executables_are_console_scripts_and_params_files_match_any_node():
    scripts = console_scripts()
    for nodes in launcher.NODES.values():
        for node in nodes:
            assert node.executable in scripts, f"{node.executable} is not a console_script of setup.py"
            module, func = scripts[node.executable].split(":")
            assert module == node.module
            assert callable(getattr(importlib.import_module(module), func))
            doc = yaml.safe_load((ROOT / node.params_file).read_text())
            assert list(doc) == ["/**"], "params files are keyed /** so that any name and namespace reads them"
    assert scripts["build_map"] == "r2former_ros.build_map_node:main"
    assert scripts["bag_player"] == "r2former_ros.bag_player:main"
    assert localize_node.NODE_NAME == launcher.LOCALIZER.name


@pytest.mark.parametrize("module, yaml_file", [(localize_node, "config/localize.yaml"),
                                               (build_map_node, "config/build_map.yaml")])
def test_yaml_lists_exactly_the_declared_parameters_with_their_defaults(module, yaml_file):
    doc = yaml.safe_load((ROOT / yaml_file).read_text())
    assert list(doc) == ["/**"]      # any node name and namespace (a namespaced node still reads it)
    params = doc["/**"]["ros__parameters"]
    specs = {s.name: s for s in module.PARAMETERS}
    assert set(params) == set(specs), (set(params) ^ set(specs))
    for name, value in params.items():
        assert type(value) is type(specs[name].default) and value == specs[name].default, name
    # every parameter has a comment right above it
    lines = (ROOT / yaml_file).read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^\s{4}\w+:", line):
            assert lines[i - 1].strip().startswith("#"), f"{yaml_file}: no comment above {line.strip()}"
    if module is localize_node:       # the comment says when it applies: "fixed" = read-only, else "live"
        for i, line in enumerate(lines):
            m = re.match(r"^\s{4}(\w+):", line)
            if m:
                j = i - 1
                while j > 0 and lines[j - 1].strip().startswith("#"):
                    j -= 1
                comment = " ".join(lines[j:i])
                spec = specs[m.group(1)]
                assert ("fixed." in comment) == spec.read_only and ("live" in comment) != spec.read_only, line
                assert ("[fixed" in spec.description) == spec.read_only, spec.name


def test_node_parameters_yaml_and_cli_take_the_localizer_config():
    """One source for the localizer's settings: LocalizerConfig's fields (default, choices, range) are the
    node's parameters, the values in config/localize.yaml and the CLI's options."""
    from r2former_core.cli.main import build_parser
    from r2former_core.options import LocalizerConfig, config_options
    specs = {s.name: s for s in localize_node.PARAMETERS}
    yaml_params = yaml.safe_load((ROOT / "config/localize.yaml").read_text())["/**"]["ros__parameters"]
    shared = [name for name in config_options(LocalizerConfig) if name in specs]
    assert {"top_k", "rerank", "min_confidence", "device"} <= set(shared)
    for name in shared:
        default, opt = config_options(LocalizerConfig)[name]
        spec = specs[name]
        assert (spec.default, spec.choices, spec.min, spec.max, spec.pattern) == (
            default, opt.choices, opt.min, opt.max, opt.pattern), name
        assert yaml_params[name] == default, name
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["localize"]
    cli = {a.dest: a for a in sub._actions}
    for name in ("top_k", "rerank", "min_confidence", "device"):
        assert cli[name].default == config_options(LocalizerConfig)[name][0], name
    assert tuple(cli["rerank"].choices) == config_options(LocalizerConfig)["rerank"][1].choices


def test_node_declares_its_table_with_descriptors():
    """Instantiating the parameter table on a bare node gives descriptors with ranges for numbers."""
    import rclpy
    from rclpy.node import Node as RosNode

    from r2former_ros.parameters import declare_parameters
    context = rclpy.Context()
    rclpy.init(context=context)
    try:
        node = RosNode("param_table_check", context=context)
        values = declare_parameters(node, localize_node.PARAMETERS)
        assert values["top_k"] == 100 and values["rerank"] == "r2former"
        for spec in localize_node.PARAMETERS:
            d = node.describe_parameter(spec.name)
            assert d.description
            if isinstance(spec.default, float):
                assert d.floating_point_range, spec.name
            elif isinstance(spec.default, int) and not isinstance(spec.default, bool):
                assert d.integer_range, spec.name
        node.destroy_node()
    finally:
        context.try_shutdown()


def test_real_launch_file_when_launch_ros_is_installed():
    launch = pytest.importorskip("launch")
    if not hasattr(launch, "LaunchDescription"):
        pytest.skip("ROS 2 `launch` is not installed (no wheel exists for it; the importable `launch` is the "
                    "source tree's launch/ folder or the unrelated PyPI package)")
    pytest.importorskip("launch_ros", reason="ROS 2 `launch_ros` is not installed (no wheel exists for it)")
    spec = importlib.util.spec_from_file_location("localize_launch_real", LAUNCH_FILE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert isinstance(mod.generate_launch_description(), launch.LaunchDescription)


# ------------------------------------------------------------------------------ CLI end to end

def test_cli_launch_runs_the_node_compressed_best_effort(tmp_path, tiny_model):
    """`r2former launch localize --compressed`: corrupt JPEGs are skipped, good ones localized; Ctrl-C -> 0."""
    from diagnostic_msgs.msg import DiagnosticArray
    from geometry_msgs.msg import PoseWithCovarianceStamped
    from sensor_msgs.msg import CompressedImage

    from r2former_ros.conversions import rgb_to_compressed_msg, sec_to_stamp, stamp_to_ns
    images = synthetic_images(6, seed=2)
    model = save_tiny_model(tiny_model, tmp_path / "tiny.safetensors")
    map_dir = build_test_map(tiny_model, images, line_poses(6), tmp_path / "map")
    params = tmp_path / "localize.yaml"
    doc = yaml.safe_load((ROOT / "config/localize.yaml").read_text())
    doc["/**"]["ros__parameters"].update(min_confidence=0.0, diagnostics_rate=5.0, tracking=False)   # a pose per image
    params.write_text(yaml.safe_dump(doc))

    probe = RosProbe("cli_launch_probe")
    poses = probe.subscribe(PoseWithCovarianceStamped, "/robot1/r2former_localizer/pose")
    diags = probe.subscribe(DiagnosticArray, "/diagnostics")
    pub = probe.publisher(CompressedImage, "/cam/image/compressed")
    log = open(tmp_path / "cli.out", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "r2former_core.cli.main", "launch", "localize",
                             "--params-file", str(params), "--map", str(map_dir), "--model", str(model),
                             "--device", "cpu", "--image-topic", "/cam/image", "--compressed",
                             "--namespace", "robot1"], stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    output = lambda: (tmp_path / "cli.out").read_text(errors="replace")  # noqa: E731
    try:
        assert probe.wait_for_subscriber("/cam/image/compressed", 60), output()
        time.sleep(0.3)
        corrupt = rgb_to_compressed_msg(images[1])
        corrupt.data = bytes(corrupt.data)[:40] + b"\x00" * 200
        for msg in (corrupt, rgb_to_compressed_msg(images[1])):
            msg.header.stamp = sec_to_stamp(7.0 + len(poses))
            pub.publish(msg)
            time.sleep(0.5)
        good = rgb_to_compressed_msg(images[3], fmt="png")
        good.header.stamp = sec_to_stamp(9.5)
        pub.publish(good)
        assert poses.wait(2, 30), output()
        assert {stamp_to_ns(p.header.stamp) for p in poses.snapshot()} == {7_000_000_000, 9_500_000_000}
        assert poses.last().header.frame_id == "map"

        def malformed() -> int:
            last = diags.last()
            if last is None:
                return -1
            status = next(st for st in last.status if st.name.endswith(": localization"))
            return int({kv.key: kv.value for kv in status.values}["malformed"])
        deadline = time.monotonic() + 5
        while malformed() != 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert malformed() == 1
        # diagnostics name the node with its namespace
        assert all(st.name.startswith("robot1/r2former_localizer: ") for st in diags.last().status)

        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0, output()
        assert time.monotonic() - t0 < 6.0
        assert "--ros-args -r __node:=r2former_localizer -r __ns:=/robot1 --params-file" in output()
    finally:
        if proc.poll() is None:          # SIGINT first: the CLI stops its nodes (they run in their own sessions)
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
        probe.close()
