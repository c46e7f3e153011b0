"""Synthetic street worlds for tests, demos and training: a procedural city loop, rendered on the CPU.

* `scene`: conditions, dimensions, palettes and the traffic record (`Mover`), shared by the modules below;
* `world`: `SyntheticWorld(seed)`: geometry (road loop, buildings with `facades`, props, ground, sky),
  drives (`trajectory`, `drive`) and traffic; the same seed always gives the same world;
* `render`: `Renderer`, the ray caster and painter behind `SyntheticWorld.render`;
* `export`: `write_drive` (image folder + TUM ground truth, or a rosbag2).
"""
from .export import write_drive
from .render import Renderer
from .scene import CAMERA_HEIGHT, CONDITIONS, HFOV_DEG, LANE, ROAD_HALF, Mover, parse_conditions
from .world import (
                    DEFAULT_SPACING,
                    EPOCH,
                    FRAME_PERIOD_NS,
                    MAX_QUERY_OFFSET,
                    MAX_QUERY_YAW,
                    Frame,
                    SyntheticWorld,
                    Trajectory,
)

__all__ = ["CAMERA_HEIGHT", "CONDITIONS", "DEFAULT_SPACING", "EPOCH", "FRAME_PERIOD_NS", "HFOV_DEG", "LANE",
           "MAX_QUERY_OFFSET", "MAX_QUERY_YAW", "ROAD_HALF", "Frame", "Mover", "Renderer", "SyntheticWorld",
           "Trajectory", "parse_conditions", "write_drive"]
