"""r2former_ros: the ROS 2 nodes of R2Former visual localization (thin rclpy layers over r2former_core)."""
import os

# torch's OpenMP threads spin while they wait for work by default. On a robot the other cores are busy
# (drivers, SLAM, Nav2), and a spinning thread then takes the CPU its partner needs: two-thread reranking
# measured 1.5-3.6x slower that way (docs/ROBOT.md section 8). Sleeping waiters cost nothing measurable on an
# idle machine. It must be set before torch loads; a value the user set is kept (OMP_WAIT_POLICY=ACTIVE).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
