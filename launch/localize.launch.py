"""Localize a camera against an R2Former map: the `localize` node, optionally RViz.

    ros2 launch r2former_ros localize.launch.py map:=/path/to/map [model:=...] [device:=cpu]
        [image_topic:=/camera/image_raw] [compressed:=true] [namespace:=robot1] [rviz:=true]
        [params_file:=/path/to/localize.yaml]

Arguments left empty keep the value of the params file (config/localize.yaml by default).
`r2former launch localize ...` starts the same node with the same parameters where `ros2 launch`
is not available (see r2former_core/cli/launch.py; a test keeps the two in step).
"""
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue
from launch_ros.substitutions import FindPackageShare

PACKAGE = "r2former_ros"


def _localizer(context, *args, **kwargs):
    cfg = context.launch_configurations
    overrides = {}
    # String parameters from launch arguments are parsed as YAML unless typed: keep them strings.
    for argument, parameter in (("map", "map_path"), ("model", "model_path"), ("device", "device")):
        if cfg.get(argument, ""):
            overrides[parameter] = ParameterValue(LaunchConfiguration(argument), value_type=str)
    if cfg.get("compressed", "false").lower() in ("true", "1", "yes"):
        overrides["image_transport"] = "compressed"
    topic = cfg.get("image_topic", "")
    remappings = [("image", topic), ("image/compressed", topic + "/compressed")] if topic else []
    parameters = [LaunchConfiguration("params_file")] + ([overrides] if overrides else [])
    return [Node(package=PACKAGE, executable="localize", name="r2former_localizer",
                 namespace=cfg.get("namespace", ""), parameters=parameters, remappings=remappings,
                 output="screen", emulate_tty=True)]


def generate_launch_description():
    share = FindPackageShare(PACKAGE)
    return LaunchDescription([
        DeclareLaunchArgument("map", default_value="", description="map directory (overrides map_path)"),
        DeclareLaunchArgument("model", default_value="",
                              description="model file (overrides model_path; empty: params file / demo model)"),
        DeclareLaunchArgument("device", default_value="", description="auto, cpu or cuda (overrides device)"),
        DeclareLaunchArgument("image_topic", default_value="",
                              description="camera topic the node's `image` is remapped to (and <topic>/compressed)"),
        DeclareLaunchArgument("compressed", default_value="false",
                              description="true: subscribe <image_topic>/compressed (sensor_msgs/CompressedImage)"),
        DeclareLaunchArgument("namespace", default_value="", description="namespace of the node"),
        DeclareLaunchArgument("rviz", default_value="false", description="start rviz2 with rviz/localize.rviz"),
        DeclareLaunchArgument("params_file",
                              default_value=PathJoinSubstitution([share, "config", "localize.yaml"]),
                              description="parameters of r2former_localizer"),
        OpaqueFunction(function=_localizer),
        Node(package="rviz2", executable="rviz2", name="rviz2", output="screen",
             arguments=["-d", PathJoinSubstitution([share, "rviz", "localize.rviz"])],
             condition=IfCondition(LaunchConfiguration("rviz"))),
    ])
