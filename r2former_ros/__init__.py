"""r2former_ros: the ROS 2 nodes of R2Former visual localization (thin rclpy layers over r2former_core)."""
from r2former_core.openmp import prefer_sleeping_waiters

prefer_sleeping_waiters()      # before the node modules import torch (docs/ROBOT.md section 8)
