"""What a synthetic world is made of, shared by its generation (`world`) and its rendering (`render`):
conditions, dimensions, palettes, the layout of the prop table, and moving traffic."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError

CONDITIONS = ("day", "dusk", "night", "winter", "autumn", "fog", "rain")
CAMERA_HEIGHT = 1.5
HFOV_DEG = 80.0
ROAD_HALF = 4.5                           # two 3.5 m lanes plus shoulders
SIDEWALK = 3.0
LANE = -1.75                              # the map drive keeps to the right lane (y points left)
PPM = 10.0                                # facade texels per metre
GROUND_RES = 0.125                        # metres per ground texel
LIGHT_RES = 1.0                           # metres per texel of the night street-light map

WALL_COLOURS = np.array([(150, 70, 55), (190, 170, 140), (200, 195, 185), (125, 125, 130), (225, 215, 180),
                         (160, 180, 190), (180, 200, 170), (210, 180, 120), (120, 80, 70), (90, 95, 105),
                         (230, 228, 220), (200, 140, 120), (170, 150, 190), (110, 130, 110)], np.float32)
GLASS = np.array([(60, 80, 100), (40, 50, 60), (90, 120, 140), (70, 90, 80), (110, 130, 150), (80, 70, 60)],
                 np.float32)
VIVID = np.array([(200, 30, 30), (30, 80, 200), (240, 200, 20), (20, 150, 60), (240, 120, 20), (150, 40, 160),
                  (20, 160, 170), (250, 250, 250), (30, 30, 30), (230, 80, 140)], np.float32)
LEAVES = {"summer": [(60, 110, 40), (80, 130, 50), (45, 90, 45)],
          "autumn": [(200, 110, 30), (170, 60, 30), (220, 170, 40), (140, 100, 40)],
          "winter": [(95, 85, 75), (110, 100, 90)]}

# Props: one row per vertical cylinder, columns below. Kinds: plain (trunk, pole), tree crown, person, lamp head,
# sign.
COL_X, COL_Y, COL_R, COL_Z0, COL_Z1, COL_KIND, COL_VAR, COL_RGB = 0, 1, 2, 3, 4, 5, 6, slice(7, 10)
PLAIN, CROWN, PERSON, LAMP, SIGN = range(5)


@dataclass
class Mover:
    """A vehicle (box) or pedestrian (cylinder) placed for one image."""
    kind: str               # "car" or "person"
    x: float
    y: float
    yaw: float
    length: float
    width: float
    height: float
    colour: tuple[float, ...]  # RGB


def parse_conditions(conditions: str | Sequence[str]) -> tuple[str, ...]:
    """'night,rain' or ["night", "rain"] -> ("night", "rain"); ConfigError naming the allowed values."""
    items = conditions.split(",") if isinstance(conditions, str) else list(conditions)
    out: list[str] = []
    for item in items:
        c = str(item).strip().lower()
        if c and c not in CONDITIONS:
            raise ConfigError(f"unknown condition {c!r}; allowed: {', '.join(CONDITIONS)}")
        if c and c not in out:
            out.append(c)
    return tuple(out) or ("day",)
