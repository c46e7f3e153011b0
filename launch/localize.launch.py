"""Localize a camera against an R2Former map: the `localize` node, optionally Nav2's lifecycle manager
and RViz.

    ros2 launch r2former_ros localize.launch.py map:=/path/to/map [model:=...] [device:=cpu]
        [image_topic:=/camera/image_raw] [compressed:=true] [odom_topic:=/odom] [tracking:=false]
        [namespace:=robot1] [rviz:=true]
        [autostart:=true] [use_sim_time:=false] [lifecycle_manager:=false]
        [params_file:=/path/to/localize.yaml] [lifecycle_params_file:=/path/to/lifecycle_manager.yaml]

Arguments left empty keep the value of the params file (config/localize.yaml by default).
`namespace` applies to every node and so to their relative topics (RViz's config uses relative
names; /diagnostics and /tf stay global). `lifecycle_manager:=true` starts nav2_lifecycle_manager
(config/lifecycle_manager.yaml) to configure and activate the node, whose own autostart is then off;
`autostart:=false` leaves the node unconfigured for an external manager.
`r2former launch localize ...` starts the same nodes with the same parameters where `ros2 launch`
is not available (see r2former_ros/launcher.py; a test keeps the two in step).
"""
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue
from launch_ros.substitutions import FindPackageShare

from launch import LaunchDescription

PACKAGE = "r2former_ros"
TRUE = ("true", "1", "yes", "on")


def _nodes(context, *args, **kwargs):
    cfg = context.launch_configurations
    namespace = cfg.get("namespace", "")
    use_sim_time = cfg.get("use_sim_time", "false").lower() in TRUE
    manager = cfg.get("lifecycle_manager", "false").lower() in TRUE
    overrides = {}
    # String parameters from launch arguments are parsed as YAML unless typed: keep them strings.
    for argument, parameter in (("map", "map_path"), ("model", "model_path"), ("device", "device"),
                                ("odom_topic", "odom_topic")):
        if cfg.get(argument, ""):
            overrides[parameter] = ParameterValue(LaunchConfiguration(argument), value_type=str)
    if cfg.get("tracking", ""):
        overrides["tracking"] = cfg["tracking"].lower() in TRUE
    if cfg.get("compressed", "false").lower() in TRUE:
        overrides["image_transport"] = "compressed"
    if manager or cfg.get("autostart", "true").lower() not in TRUE:
        overrides["autostart"] = False           # the lifecycle manager (or another) brings it up
    if use_sim_time:
        overrides["use_sim_time"] = True
    topic = cfg.get("image_topic", "")
    remappings = [("image", topic), ("image/compressed", topic + "/compressed")] if topic else []
    parameters = [LaunchConfiguration("params_file")] + ([overrides] if overrides else [])
    nodes = [Node(package=PACKAGE, executable="localize", name="r2former_localizer", namespace=namespace,
                  parameters=parameters, remappings=remappings, output="screen", emulate_tty=True)]
    sim = [{"use_sim_time": True}] if use_sim_time else []
    if manager:
        nodes.append(Node(package="nav2_lifecycle_manager", executable="lifecycle_manager",
                          name="lifecycle_manager_localization", namespace=namespace,
                          parameters=[LaunchConfiguration("lifecycle_params_file")] + sim, output="screen"))
    if cfg.get("rviz", "false").lower() in TRUE:     # rviz2 is looked up only when asked for
        nodes.append(Node(package="rviz2", executable="rviz2", name="rviz2", namespace=namespace,
                          arguments=["-d", PathJoinSubstitution([FindPackageShare(PACKAGE), "rviz", "localize.rviz"])],
                          parameters=sim, remappings=remappings, output="screen"))
    return nodes


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
        DeclareLaunchArgument("odom_topic", default_value="",
                              description="nav_msgs/Odometry topic for the tracker (overrides odom_topic)"),
        DeclareLaunchArgument("tracking", default_value="",
                              description="true / false: filter over time or single frames (overrides tracking)"),
        DeclareLaunchArgument("namespace", default_value="",
                              description="namespace of every node (and so of their relative topics)"),
        DeclareLaunchArgument("rviz", default_value="false", description="start rviz2 with rviz/localize.rviz"),
        DeclareLaunchArgument("autostart", default_value="true",
                              description="the node configures and activates itself; false: wait for a manager"),
        DeclareLaunchArgument("use_sim_time", default_value="false",
                              description="use /clock (simulation or bag playback) in every node"),
        DeclareLaunchArgument("lifecycle_manager", default_value="false",
                              description="start nav2_lifecycle_manager to bring the node up (autostart off)"),
        DeclareLaunchArgument("params_file",
                              default_value=PathJoinSubstitution([share, "config", "localize.yaml"]),
                              description="parameters of r2former_localizer"),
        DeclareLaunchArgument("lifecycle_params_file",
                              default_value=PathJoinSubstitution([share, "config", "lifecycle_manager.yaml"]),
                              description="parameters of the lifecycle manager (node_names, autostart, bond)"),
        OpaqueFunction(function=_nodes),
    ])
