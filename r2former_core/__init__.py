"""r2former_core: R2Former visual localization without ROS (model, maps, localizer, training)."""
__version__ = "0.1.0"
