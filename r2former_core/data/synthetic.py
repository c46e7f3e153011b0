"""Synthetic street world for tests, demos and training: a procedural city loop, rendered on the CPU.

Everything is derived from one seed: a smooth closed road (straight streets, rounded corners), textured
buildings on both sides in two rows, trees, street lamps and signs on the sidewalks. Images come from a
pinhole camera 1.5 m above the road, rendered by vectorised ray casting per image column: a 2D ray
against the wall segments (the 3 nearest front-facing hits, so taller buildings show above nearer ones),
textured ground by inverse perspective, a panoramic sky; props and vehicles are painted through a depth
buffer. All textures (facades, ground, sky) are sampled with `cv2.remap` from small mip pyramids so far
facades do not shimmer.

Conventions: world x/y in metres, z up; a pose's yaw is about +z and yaw = 0 looks along +x; image
columns grow to the camera's right. `Frame.pose` is (x, y, z, qx, qy, qz, qw) with z = camera height.
"""
from __future__ import annotations

import logging
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import cv2
import numpy as np

log = logging.getLogger(__name__)

CONDITIONS = ("day", "dusk", "night", "winter", "autumn", "fog", "rain")
EPOCH = 1_700_000_000.0
FRAME_PERIOD_NS = 100_000_000             # 10 Hz
CAMERA_HEIGHT = 1.5
HFOV_DEG = 80.0
ROAD_HALF = 4.5                           # two 3.5 m lanes plus shoulders
SIDEWALK = 3.0
LANE = -1.75                              # the map drive keeps to the right lane (y points left)
DEFAULT_SPACING = 2.0                     # metres between frames when none is given
MAX_QUERY_OFFSET = 2.0                    # metres, lateral, query drive relative to the map drive
MAX_QUERY_YAW = math.radians(15.0)
PPM = 10.0                                # facade texels per metre
GROUND_RES = 0.125                        # metres per ground texel
LIGHT_RES = 1.0                           # metres per texel of the night street-light map
LAYERS = 3                                # wall hits kept per column
FAR = 160.0                               # walls beyond this are not drawn
PROP_RANGE = 60.0                         # nor props and vehicles beyond this (they would be a pixel or two)

_WALL_COLOURS = np.array([(150, 70, 55), (190, 170, 140), (200, 195, 185), (125, 125, 130), (225, 215, 180),
                          (160, 180, 190), (180, 200, 170), (210, 180, 120), (120, 80, 70), (90, 95, 105),
                          (230, 228, 220), (200, 140, 120), (170, 150, 190), (110, 130, 110)], np.float32)
_GLASS = np.array([(60, 80, 100), (40, 50, 60), (90, 120, 140), (70, 90, 80), (110, 130, 150), (80, 70, 60)],
                  np.float32)
_VIVID = np.array([(200, 30, 30), (30, 80, 200), (240, 200, 20), (20, 150, 60), (240, 120, 20), (150, 40, 160),
                   (20, 160, 170), (250, 250, 250), (30, 30, 30), (230, 80, 140)], np.float32)
_LEAVES = {"summer": [(60, 110, 40), (80, 130, 50), (45, 90, 45)],
           "autumn": [(200, 110, 30), (170, 60, 30), (220, 170, 40), (140, 100, 40)],
           "winter": [(95, 85, 75), (110, 100, 90)]}
# Props: one row per cylinder, columns below. Kinds: plain (trunk, pole), tree crown, person, lamp head, sign.
_X, _Y, _R, _Z0, _Z1, _KIND, _VAR, _RGB = 0, 1, 2, 3, 4, 5, 6, slice(7, 10)
PLAIN, CROWN, PERSON, LAMP, SIGN = range(5)


@dataclass
class Frame:
    stamp: float            # seconds
    pose: np.ndarray        # (7,) x y z qx qy qz qw, float64
    image: np.ndarray       # HxWx3 uint8 RGB


@dataclass
class Trajectory:
    """Ground-truth poses of a drive; `stamps_ns` are exact, `stamps` the same in seconds."""
    stamps_ns: np.ndarray   # (N,) int64
    poses: np.ndarray       # (N, 7) float64

    @property
    def stamps(self) -> np.ndarray:
        return self.stamps_ns / 1e9


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
    colour: tuple[float, float, float]


def parse_conditions(conditions: str | Sequence[str]) -> tuple[str, ...]:
    """'night,rain' or ["night", "rain"] -> ("night", "rain"); raises ValueError naming the allowed values."""
    items = conditions.split(",") if isinstance(conditions, str) else list(conditions)
    out: list[str] = []
    for item in items:
        c = str(item).strip().lower()
        if c and c not in CONDITIONS:
            raise ValueError(f"unknown condition {c!r}; allowed: {', '.join(CONDITIONS)}")
        if c and c not in out:
            out.append(c)
    return tuple(out) or ("day",)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cell: float) -> np.ndarray:
    small = rng.random((max(2, int(shape[0] / cell) + 2), max(2, int(shape[1] / cell) + 2))).astype(np.float32)
    return cv2.resize(small, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)


_NOISE: dict[tuple[int, int], np.ndarray] = {}


def _noise_tile(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Grey unit Gaussian sensor noise (h, w, 3): a random window of a fixed tile, far cheaper than fresh noise."""
    if (h, w) not in _NOISE:
        _NOISE[(h, w)] = _rgb(np.random.default_rng(0).standard_normal((h + 64, w + 64), dtype=np.float32))
    y, x = rng.integers(0, 65, 2)
    return _NOISE[(h, w)][y:y + h, x:x + w]


_LEAF_NOISE = np.random.default_rng(1).random((256, 256), dtype=np.float32)


def _rgb(grey: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(np.ascontiguousarray(grey, np.float32), cv2.COLOR_GRAY2RGB)


def _mip(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pack levels 0, 1, 2 of a pyramid into one image; returns it and rows (offset_x, offset_y, scale)."""
    h, w = image.shape[:2]
    l1 = cv2.resize(image, (w // 2, h // 2), interpolation=cv2.INTER_AREA)
    l2 = cv2.resize(l1, (w // 4, h // 4), interpolation=cv2.INTER_AREA)
    out = np.zeros((h + h // 2, w) + image.shape[2:], image.dtype)
    out[:h] = image
    out[h:h + h // 2, :w // 2] = l1
    out[h:h + h // 4, w // 2:w // 2 + w // 4] = l2
    return out, np.array([(0, 0, 1.0), (0, h, 0.5), (w // 2, h, 0.25)], np.float32)


class _Route:
    """Closed, smooth, counter-clockwise road centreline sampled every metre."""

    def __init__(self, rng: np.random.Generator, radius: float):
        n = int(rng.integers(5, 9))
        ang = (np.arange(n) + rng.uniform(-0.3, 0.3, n)) * 2 * np.pi / n
        rad = radius * rng.uniform(0.75, 1.2, n)
        corners = np.stack([rad * np.cos(ang), rad * np.sin(ang)], 1)
        nxt = np.roll(corners, -1, 0)
        # Collinear control points along each edge keep streets straight; Chaikin rounds only the corners.
        pts = np.concatenate([corners[:, None], (0.8 * corners + 0.2 * nxt)[:, None],
                              (0.2 * corners + 0.8 * nxt)[:, None]], 1).reshape(-1, 2)
        for _ in range(5):
            nxt = np.roll(pts, -1, 0)
            pts = np.stack([0.75 * pts + 0.25 * nxt, 0.25 * pts + 0.75 * nxt], 1).reshape(-1, 2)
        closed = np.vstack([pts, pts[:1]])
        cum = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(closed, axis=0), axis=1))])
        self.length = float(cum[-1])
        s = np.arange(0.0, self.length, 1.0)
        self.pts = np.stack([np.interp(s, cum, closed[:, 0]), np.interp(s, cum, closed[:, 1])], 1)
        d = np.roll(self.pts, -1, 0) - np.roll(self.pts, 1, 0)
        self.tangent = d / np.linalg.norm(d, axis=1, keepdims=True)

    def at(self, s: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        """Positions (N, 2) and unit tangents (N, 2) at arc lengths s (wrapping around the loop)."""
        s = np.mod(np.atleast_1d(np.asarray(s, np.float64)), self.length)
        i0 = np.floor(s).astype(int) % len(self.pts)
        i1 = (i0 + 1) % len(self.pts)
        last = self.length - (len(self.pts) - 1)                 # the closing segment is shorter than 1 m
        w = np.where(i1 == 0, (s - i0) / max(last, 1e-6), s - i0).clip(0, 1)[:, None]
        tan = (1 - w) * self.tangent[i0] + w * self.tangent[i1]
        return (1 - w) * self.pts[i0] + w * self.pts[i1], tan / np.linalg.norm(tan, axis=1, keepdims=True)

    def project(self, x: float, y: float) -> tuple[float, float, float]:
        """Arc length, signed lateral offset (left positive) and heading of the nearest centreline point."""
        i = int(np.argmin(((self.pts - (x, y)) ** 2).sum(1)))
        s = i + float(np.clip((np.array([x, y]) - self.pts[i]) @ self.tangent[i], -1, 1))
        (p,), (t,) = self.at(s)                          # refine with the interpolated tangent
        s = (s + float((np.array([x, y]) - p) @ t)) % self.length
        (p,), (t,) = self.at(s)
        return s, float((np.array([x, y]) - p) @ (-t[1], t[0])), math.atan2(t[1], t[0])


@dataclass
class _Camera:
    x: float
    y: float
    yaw: float
    h: int
    w: int

    def __post_init__(self) -> None:
        self.f = (self.w / 2) / math.tan(math.radians(HFOV_DEG) / 2)
        self.cx, self.cy = self.w / 2, self.h / 2
        self.fwd = np.array([math.cos(self.yaw), math.sin(self.yaw)])
        self.right = np.array([math.sin(self.yaw), -math.cos(self.yaw)])
        self.xr = (np.arange(self.w) + 0.5 - self.cx) / self.f           # rightward slope per column
        self.rc = np.arange(self.h, dtype=np.float32) + 0.5               # row centres
        self.dirs = self.fwd[None] + self.xr[:, None] * self.right[None]  # forward component 1: t = depth

    def to_cam(self, x: float, y: float) -> tuple[float, float]:
        rel = np.array([x - self.x, y - self.y])
        return float(rel @ self.fwd), float(rel @ self.right)


@dataclass
class _Style:
    kind: str
    wall: np.ndarray
    trim: np.ndarray
    glass: np.ndarray
    floor_h: float
    ground_h: float
    bay: float
    win_w: float
    win_h: float
    shops: bool
    balcony: float
    bands: bool


def _new_style(rng: np.random.Generator) -> _Style:
    kind = str(rng.choice(["residential", "residential", "brick", "office", "industrial"]))
    wall = _WALL_COLOURS[rng.integers(len(_WALL_COLOURS))] * rng.uniform(0.85, 1.1)
    if kind == "brick":
        wall = np.array([rng.uniform(120, 170), rng.uniform(55, 80), rng.uniform(40, 60)], np.float32)
    return _Style(kind, wall, _WALL_COLOURS[rng.integers(len(_WALL_COLOURS))] * rng.uniform(0.6, 1.1),
                  _GLASS[rng.integers(len(_GLASS))], rng.uniform(2.8, 3.6), rng.uniform(3.6, 4.6),
                  rng.uniform(2.0, 3.6), rng.uniform(0.35, 0.6), rng.uniform(0.4, 0.65), rng.random() < 0.55,
                  rng.random() * 0.6 if kind == "residential" else 0.0, rng.random() < 0.5)


class _Canvas:
    """A facade texture addressed in metres: u to the right, v up from the ground; `lit` = window ids."""

    def __init__(self, w_m: float, h_m: float, colour: np.ndarray):
        self.w_m, self.h_m = w_m, h_m
        self.rgb = np.empty((max(4, round(h_m * PPM)), max(4, round(w_m * PPM)), 3), np.uint8)
        self.rgb[:] = np.clip(colour, 0, 255)
        self.lit = np.zeros(self.rgb.shape[:2], np.uint8)

    def px(self, u: float, v: float) -> tuple[int, int]:
        return int(round(u * PPM)), int(round((self.h_m - v) * PPM))

    def rect(self, u0: float, v0: float, u1: float, v1: float, colour, lit: int | None = None) -> None:
        (x0, y1), (x1, y0) = self.px(u0, v0), self.px(u1, v1)
        self.rgb[max(y0, 0):y1, max(x0, 0):x1] = np.clip(colour, 0, 255)
        if lit is not None:
            self.lit[max(y0, 0):y1, max(x0, 0):x1] = lit


def _draw_facade(c: _Canvas, rng: np.random.Generator, st: _Style, front: bool) -> None:
    w, h = c.w_m, c.h_m
    g = st.ground_h if front else 0.6
    floors = max(0, int((h - g - 0.8) / st.floor_h))
    bays = max(1, int(w / st.bay))
    bay = w / bays
    if front and st.kind == "office":
        c.rect(0, g, w, h, st.trim * 0.7)
        for j in range(floors):
            for i in range(bays):
                c.rect(i * bay + 0.08, g + j * st.floor_h + 0.1, (i + 1) * bay - 0.08, g + (j + 1) * st.floor_h - 0.1,
                       st.glass * rng.uniform(0.8, 1.3), int(rng.integers(1, 256)))
    else:
        if st.kind == "industrial":
            for u in np.arange(0, w, 0.6):
                c.rect(u, 0, u + 0.3, h, st.wall * 0.88)
        if (not front and rng.random() < 0.5) or (st.kind == "industrial" and rng.random() < 0.5):
            floors = min(floors, 1)
        for j in range(floors):
            v0 = g + j * st.floor_h + st.floor_h * (1 - st.win_h) * 0.6
            v1 = v0 + st.floor_h * st.win_h
            if st.bands:
                c.rect(0, g + j * st.floor_h - 0.12, w, g + j * st.floor_h + 0.12, st.trim)
            for i in range(bays):
                if not front and rng.random() < 0.5:
                    continue
                um = (i + 0.5) * bay
                hw = bay * st.win_w / 2
                if rng.random() < st.balcony:
                    c.rect(um - hw - 0.4, v0 - 0.3, um + hw + 0.4, v0 + 0.7, st.trim * 0.5)
                c.rect(um - hw - 0.1, v0 - 0.1, um + hw + 0.1, v1 + 0.1, st.trim)
                glass = st.glass * rng.uniform(0.7, 1.4)
                c.rect(um - hw, v0, um + hw, v1, glass, int(rng.integers(1, 256)))
                if rng.random() < 0.3:    # curtains
                    c.rect(um - hw, v1 - (v1 - v0) * 0.4, um + hw, v1, _WALL_COLOURS[rng.integers(14)] * 0.9)
                c.rect(um - hw - 0.15, v0 - 0.2, um + hw + 0.15, v0 - 0.08, st.trim * 0.8)
    c.rect(0, h - 0.5, w, h, st.trim * 0.6)                                     # parapet
    if front:
        _draw_ground_floor(c, rng, st)
    if rng.random() < (0.1 if front else 0.2):                                  # mural: a rare landmark
        x0, y0 = c.px(rng.uniform(0, w * 0.5), rng.uniform(g + 1, max(g + 1.5, h - 2)))
        for _ in range(int(rng.integers(2, 6))):
            cv2.circle(c.rgb, (x0 + int(rng.integers(-30, 60)), y0 + int(rng.integers(-30, 30))),
                       int(rng.integers(8, 40)), _VIVID[rng.integers(len(_VIVID))].tolist(), -1)


def _draw_ground_floor(c: _Canvas, rng: np.random.Generator, st: _Style) -> None:
    g, u = st.ground_h, 0.3
    c.rect(0, g - 0.15, c.w_m, g, st.trim * 0.7)
    while u < c.w_m - 2.5:
        sw = min(rng.uniform(4, 8), c.w_m - 0.3 - u)
        if st.shops:
            c.rect(u + 0.2, 0.5, u + sw - 1.6, g - 1.3, st.glass * rng.uniform(0.6, 1.1), int(rng.integers(120, 256)))
            c.rect(u + sw - 1.4, 0, u + sw - 0.2, 2.3, st.trim * 0.4)                  # door
            sign = _VIVID[rng.integers(len(_VIVID))]
            c.rect(u + 0.1, g - 1.15, u + sw - 0.1, g - 0.3, sign)
            text = "".join(chr(int(rng.integers(65, 91))) for _ in range(int(rng.integers(3, 7))))
            x0, y0 = c.px(u + 0.4, g - 0.45)
            ink = (255, 255, 255) if sign.mean() < 140 else (20, 20, 20)
            cv2.putText(c.rgb, text, (x0, y0), cv2.FONT_HERSHEY_SIMPLEX, 0.3, ink, 1, cv2.LINE_AA)
            if rng.random() < 0.4:                                                   # striped awning
                a, b = _VIVID[rng.integers(len(_VIVID))], _VIVID[rng.integers(len(_VIVID))]
                for k, uu in enumerate(np.arange(u + 0.1, u + sw - 0.1, 0.5)):
                    c.rect(uu, g - 1.6, min(uu + 0.5, u + sw - 0.1), g - 1.15, a if k % 2 else b)
        elif st.kind == "industrial":
            c.rect(u + 0.5, 0, u + sw - 0.5, min(g - 0.5, 3.6), st.trim * 0.75)          # roller door
            for v in np.arange(0.2, min(g - 0.5, 3.6), 0.3):
                c.rect(u + 0.5, v, u + sw - 0.5, v + 0.06, st.trim * 0.5)
        else:
            c.rect(u + sw / 2 - 0.6, 0, u + sw / 2 + 0.6, 2.4, st.trim * 0.45)
            c.rect(u + 0.5, 1.0, u + 1.6, 2.4, st.glass, int(rng.integers(1, 256)))
            if rng.random() < 0.5:                                                   # poster
                c.rect(u + sw - 1.8, 0.8, u + sw - 0.9, 2.2, _VIVID[rng.integers(len(_VIVID))])
        u += sw


class SyntheticWorld:
    """A deterministic procedural city loop. The same seed always gives the same geometry and textures."""

    def __init__(self, seed: int, radius: float = 70.0):
        self.seed = int(seed)
        self._traffic: dict[tuple, list] = {}
        self._sky_rgb: dict[tuple, np.ndarray] = {}
        rng = np.random.default_rng(self.seed)
        self._route = _Route(rng, radius)
        self._sun = np.array([math.cos(a := rng.uniform(0, 2 * np.pi)), math.sin(a)])
        lo = self._route.pts.min(0) - 55                # second-row buildings end about 45 m off the road
        hi = self._route.pts.max(0) + 55
        self._origin = lo
        self._grid = np.ceil((hi - lo) / 0.5).astype(int)          # occupancy raster (0.5 m) for placement
        blocked = np.zeros((self._grid[1], self._grid[0]), np.uint8)
        cv2.polylines(blocked, [self._occ(self._route.pts)], True, 1, int(2 * (ROAD_HALF + SIDEWALK + 0.5) / 0.5))
        self._build_buildings(rng, blocked)
        self._build_props(rng, blocked)
        self._build_ground(rng, hi - lo)
        self._build_sky(rng)
        log.debug("synthetic world", extra={"seed": seed, "route_m": round(self.route_length, 1),
                                            "walls": len(self._wA), "props": len(self._props)})

    # ---------------------------------------------------------------- generation
    def _occ(self, pts: np.ndarray) -> np.ndarray:
        return np.round((pts - self._origin) / 0.5).astype(np.int32).reshape(-1, 1, 2)

    def _build_buildings(self, rng: np.random.Generator, blocked: np.ndarray) -> None:
        textures: list[np.ndarray] = []
        walls: list[tuple] = []                        # A, B, outward normal, height, texture index
        style = _new_style(rng)
        for side in (1.0, -1.0):
            for setback, (wlo, whi), (hlo, hhi) in ((8.0, (8, 24), (6, 24)), (26.0, (12, 30), (10, 40))):
                s = rng.uniform(0, 6)
                while s < self._route.length:
                    width, depth = rng.uniform(wlo, whi), rng.uniform(8, 16)
                    (pos,), (tan,) = self._route.at(s + width / 2)
                    away = side * np.array([-tan[1], tan[0]])
                    centre = pos + away * (setback + rng.uniform(0, 2.5) + depth / 2)
                    s += width + (0 if rng.random() < 0.5 else rng.uniform(2, 10))
                    corners = [centre + a * tan * width / 2 + b * away * depth / 2 for a, b in
                               ((-1, -1), (1, -1), (1, 1), (-1, 1))]
                    inner = [centre + a * tan * (width / 2 - 0.6) + b * away * (depth / 2 - 0.6) for a, b in
                             ((-1, -1), (1, -1), (1, 1), (-1, 1))]
                    poly = self._occ(np.array(inner))
                    (x0, y0), (x1, y1) = poly.min((0, 1)), poly.max((0, 1)) + 1
                    if x0 < 0 or y0 < 0 or x1 > blocked.shape[1] or y1 > blocked.shape[0]:
                        continue
                    test = np.zeros((y1 - y0, x1 - x0), np.uint8)
                    cv2.fillPoly(test, [poly - (x0, y0)], 1)
                    if (test & blocked[y0:y1, x0:x1]).any():
                        continue
                    cv2.fillPoly(blocked, [self._occ(np.array(corners))], 1)
                    height = rng.uniform(hlo, hhi) * (2.2 if rng.random() < 0.05 else 1.0)
                    if rng.random() > 0.35:                 # otherwise repeat the neighbour's style (terraces)
                        style = _new_style(rng)
                    front = _Canvas(width, height, style.wall)
                    _draw_facade(front, rng, style, front=True)
                    side_tex = _Canvas(max(width, depth), height, style.wall * rng.uniform(0.9, 1.05))
                    _draw_facade(side_tex, rng, style, front=False)
                    for canvas in (front, side_tex):
                        noise = _smooth_noise(rng, canvas.lit.shape, 12)[..., None]
                        grain = rng.normal(0, 5, canvas.rgb.shape).astype(np.float32)
                        rgb = np.clip(canvas.rgb * (0.85 + 0.3 * noise) + grain, 0, 255).astype(np.uint8)
                        textures.append(np.dstack([rgb, canvas.lit]))
                    for k, normal in enumerate((-away, tan, away, -tan)):
                        rot = np.array([-normal[1], normal[0]])          # u grows to the viewer's right
                        half_n = depth / 2 if k % 2 == 0 else width / 2
                        half_r = width / 2 if k % 2 == 0 else depth / 2
                        a = centre + normal * half_n - rot * half_r
                        walls.append((a, a + 2 * rot * half_r, normal, height, len(textures) - (2 if k == 0 else 1)))
        atlas, offsets = self._pack(textures)
        self._atlas, self._atlas_mip = _mip(atlas)
        self._wA = np.array([w[0] for w in walls])
        self._wB = np.array([w[1] for w in walls])
        self._wN = np.array([w[2] for w in walls])
        self._wH = np.array([w[3] for w in walls])
        self._wLen = np.linalg.norm(self._wB - self._wA, axis=1)
        self._wTex = offsets[[w[4] for w in walls]].astype(np.float64)        # atlas x, y of (u=0, v=height)
        self._wShade = 0.6 + 0.4 * np.clip(self._wN @ self._sun, 0, 1)

    @staticmethod
    def _pack(textures: list[np.ndarray], width: int = 4096, pad: int = 4) -> tuple[np.ndarray, np.ndarray]:
        """Shelf packing of facade textures into one atlas (pads keep bilinear taps inside a facade)."""
        order = sorted(range(len(textures)), key=lambda i: -textures[i].shape[0])
        offsets = np.zeros((len(textures), 2), np.int64)
        x = y = shelf = 0
        for i in order:
            th, tw = textures[i].shape[:2]
            if x + tw + pad > width:
                x, y, shelf = 0, y + shelf + pad, 0
            offsets[i] = (x, y)
            x, shelf = x + tw + pad, max(shelf, th)
        atlas = np.zeros((((y + shelf + pad) + 3) // 4 * 4, width, 4), np.uint8)
        for i, (ox, oy) in enumerate(offsets):
            th, tw = textures[i].shape[:2]
            atlas[oy:oy + th, ox:ox + tw] = textures[i]
        return atlas, offsets

    def _build_props(self, rng: np.random.Generator, blocked: np.ndarray) -> None:
        rows: list[list[float]] = []

        def add(x, y, r, z0, z1, kind, colour):
            rows.append([x, y, r, z0, z1, kind, rng.random(), *colour])

        L = self._route.length
        lamps = []
        for s in np.arange(rng.uniform(0, 30), L - 5, 30.0):
            side = 1 if int(s / 30) % 2 else -1
            (p,), (t,) = self._route.at(s)
            n = side * np.array([-t[1], t[0]])
            base = p + n * (ROAD_HALF + 0.4)
            add(*base, 0.1, 0, 6.5, PLAIN, (90, 92, 95))
            head = base - n * 0.3
            add(*head, 0.25, 6.4, 6.75, LAMP, (60, 60, 62))
            lamps.append(head)
        for start in np.arange(0, L, 50.0):
            for side in (1, -1):
                if rng.random() < 0.55:
                    for s in np.arange(start + rng.uniform(0, 5), start + 50, rng.uniform(7, 12)):
                        (p,), (t,) = self._route.at(s)
                        self._add_tree(add, rng, p + side * np.array([-t[1], t[0]]) * (ROAD_HALF + 1.5))
        for s in rng.uniform(0, L, int(L / 40)):
            side = rng.choice([-1, 1])
            (p,), (t,) = self._route.at(s)
            q = p + side * np.array([-t[1], t[0]]) * (ROAD_HALF + 0.5)
            add(*q, 0.05, 0, 2.2, PLAIN, (120, 120, 125))
            add(*q, 0.35, 2.2, 2.9, SIGN, _VIVID[rng.integers(6)])
        for s in rng.uniform(0, L, int(L / 35)):                     # bins and bollards
            (p,), (t,) = self._route.at(s)
            q = p + rng.choice([-1, 1]) * np.array([-t[1], t[0]]) * (ROAD_HALF + rng.uniform(0.5, 2.8))
            add(*q, rng.uniform(0.15, 0.35), 0, rng.uniform(0.8, 1.1), PLAIN, _WALL_COLOURS[rng.integers(14)] * 0.6)
        cand = self._origin + rng.random((int(L / 4), 2)) * (self._grid * 0.5)
        for q in cand:                                                # park trees between and behind buildings
            i, j = ((q - self._origin) / 0.5).astype(int)
            if not blocked[max(j - 4, 0):j + 5, max(i - 4, 0):i + 5].any():
                self._add_tree(add, rng, q)
        self._props = np.array(rows, np.float64)
        self._lamps = np.array(lamps)

    @staticmethod
    def _add_tree(add, rng: np.random.Generator, q: np.ndarray) -> None:
        trunk = rng.uniform(2.0, 3.5)
        crown = rng.uniform(1.4, 3.0)
        add(*q, rng.uniform(0.12, 0.25), 0, trunk + crown, PLAIN, (85, 65, 50))
        add(*q, crown, trunk, trunk + 2 * crown * rng.uniform(0.8, 1.1), CROWN, (0, 0, 0))

    def _build_ground(self, rng: np.random.Generator, extent: np.ndarray) -> None:
        """Top-view ground raster: RGB + 'coverage' (how much snow or leaves a texel collects)."""
        w, h = np.ceil(extent / GROUND_RES).astype(int)
        to_px = lambda pts: np.round((pts - self._origin) / GROUND_RES).astype(np.int32).reshape(-1, 1, 2)  # noqa
        rgb = np.empty((h, w, 3), np.uint8)
        rgb[:] = (95, 120, 65)
        cov = np.full((h, w), 230, np.uint8)
        pts, tan = self._route.pts, self._route.tangent
        normal = np.stack([-tan[:, 1], tan[:, 0]], 1)
        thick = lambda m: max(1, int(round(2 * m / GROUND_RES)))  # noqa
        bands = ((ROAD_HALF + SIDEWALK + 4, (150, 140, 125), 150), (ROAD_HALF + SIDEWALK, (165, 165, 160), 120),
                 (ROAD_HALF + 0.15, (185, 185, 180), 90), (ROAD_HALF, (70, 70, 74), 40))   # forecourt .. asphalt
        for half, colour, c in bands:
            cv2.polylines(rgb, [to_px(pts)], True, colour, thick(half))
            cv2.polylines(cov, [to_px(pts)], True, c, thick(half))
        tiles = np.zeros((h, w), bool)
        tiles[::4], tiles[:, ::4] = True, True
        tiles &= cov == 120                                                          # paving joints (0.5 m)
        rgb[tiles] = rgb[tiles] // 5 * 4
        for s in rng.uniform(0, self._route.length, int(self._route.length / 25)):   # asphalt patches
            (p,), (t,) = self._route.at(s)
            box = cv2.boxPoints(((float(p[0] - self._origin[0]) / GROUND_RES + rng.uniform(-20, 20),
                                  float(p[1] - self._origin[1]) / GROUND_RES + rng.uniform(-20, 20)),
                                 (rng.uniform(10, 40), rng.uniform(10, 30)), rng.uniform(0, 180)))
            cv2.fillPoly(rgb, [box.astype(np.int32)], (int(rng.integers(45, 95)),) * 3)
        for off in (-ROAD_HALF + 0.4, ROAD_HALF - 0.4):                              # edge lines
            cv2.polylines(rgb, [to_px(pts + normal * off)], True, (225, 225, 220), thick(0.08))
        for i in range(0, len(pts) - 3, 6):                                          # dashed centre line
            cv2.line(rgb, tuple(to_px(pts[i:i + 1])[0, 0]), tuple(to_px(pts[i + 3:i + 4])[0, 0]), (230, 210, 120),
                     thick(0.08))
        for off in (LANE - 0.9, LANE + 0.9, -LANE - 0.9, -LANE + 0.9):               # wheel tracks stay clear of snow
            cv2.polylines(cov, [to_px(pts + normal * off)], True, 0, thick(0.3))
        for s in rng.uniform(0, self._route.length, int(self._route.length / 90) + 1):  # zebra crossings
            (p,), (t,) = self._route.at(s)
            n = np.array([-t[1], t[0]])
            for k in np.arange(-ROAD_HALF + 0.5, ROAD_HALF - 0.4, 1.0):
                a, b = p + n * k, p + n * (k + 0.5)
                quad = np.array([a - t * 1.5, b - t * 1.5, b + t * 1.5, a + t * 1.5])
                cv2.fillPoly(rgb, [to_px(quad)], (235, 235, 230))
        shade = 0.8 + 0.4 * _smooth_noise(rng, (h, w), 40)
        grain = rng.integers(-12, 13, (h, w), dtype=np.int16)
        rgb = np.clip(rgb * shade[..., None] + grain[..., None], 0, 255).astype(np.uint8)
        cov = np.clip(cov.astype(np.int16) + grain * 3, 0, 255).astype(np.uint8)
        self._ground, self._ground_mip = _mip(np.dstack([rgb, cov]))
        light = np.zeros(np.ceil(extent / LIGHT_RES).astype(int)[::-1], np.float32)
        for p in self._lamps:
            i, j = ((p - self._origin) / LIGHT_RES).astype(int)
            light[j, i] += 1.0
        self._light = cv2.GaussianBlur(light, (0, 0), 4.0 / LIGHT_RES) * 2 * np.pi * 16 / LIGHT_RES ** 2

    def _build_sky(self, rng: np.random.Generator) -> None:
        """Panorama (azimuth x elevation 0..45 deg): channel 0 clouds, channel 1 distant skyline."""
        h, w = 128, 1024
        n = 0.65 * _smooth_noise(rng, (h, w), 24) + 0.35 * _smooth_noise(rng, (h, w), 6)
        clouds = np.clip((n - 0.5) * 3.5, 0, 1) * np.linspace(1, 0.5, h)[:, None]
        skyline = np.zeros((h, w), np.float32)
        x = 0
        while x < w:
            bw = int(rng.integers(4, 24))
            top = h - 1 - int(rng.uniform(0, 4.5) / 45 * h)
            skyline[top:, x:x + bw] = 1
            x += bw
        sky = (np.dstack([clouds, skyline]) * 255).astype(np.uint8)
        self._sky = np.concatenate([sky, sky[:, :1]], 1)              # wrap column for bilinear taps

    # ---------------------------------------------------------------- queries
    @property
    def route_length(self) -> float:
        return self._route.length

    def project(self, x: float, y: float) -> tuple[float, float, float]:
        """(arc length, lateral offset left-positive, road heading) of the route point nearest to (x, y)."""
        return self._route.project(x, y)

    def trajectory(self, kind: str = "map", frames: int = 100, spacing: float | None = None,
                   substeps: int = 1) -> Trajectory:
        """Ground-truth poses of a drive; substeps > 1 adds poses between frames (e.g. 2 for 20 Hz odometry).

        The map drive follows the right lane exactly. The query drive starts between map frames and keeps a
        seed-dependent lateral offset (at most MAX_QUERY_OFFSET) and a slowly varying yaw jitter (at most
        MAX_QUERY_YAW), so it never sees exactly the map's viewpoints.
        """
        if kind not in ("map", "query"):
            raise ValueError(f"drive kind must be 'map' or 'query', not {kind!r}")
        if frames < 1:
            raise ValueError("frames must be at least 1")
        # Default: 2 m apart (20 m/s at 10 Hz), or closer when that would drive more than once around the loop.
        spacing = min(self.route_length / frames, DEFAULT_SPACING) if spacing is None else float(spacing)
        if spacing <= 0:
            raise ValueError("spacing must be positive")
        rng = np.random.default_rng([self.seed, 7])
        s0 = rng.uniform(0, self.route_length)
        q = rng.uniform(-1, 1, 6)
        phi = np.arange((frames - 1) * substeps + 1) / substeps
        lateral, dyaw = np.full_like(phi, LANE), np.zeros_like(phi)
        if kind == "query":
            phi_s = phi + 0.3 + 0.4 * (q[0] + 1) / 2
            # a constant part plus a slow wave, each bounded so that their sum stays within the maxima
            lateral = LANE + MAX_QUERY_OFFSET * (0.75 * q[1] + 0.24 * np.sin(2 * np.pi * phi_s / 23.0 + 3 * q[2]))
            dyaw = MAX_QUERY_YAW * (0.6 * q[3] * np.sin(2 * np.pi * phi_s / 17.0 + 3 * q[4]) + 0.35 * q[5])
        else:
            phi_s = phi
        pos, tan = self._route.at(s0 + phi_s * spacing)
        xy = pos + lateral[:, None] * np.stack([-tan[:, 1], tan[:, 0]], 1)
        yaw = np.arctan2(tan[:, 1], tan[:, 0]) + dyaw
        poses = np.zeros((len(phi), 7))
        poses[:, :2], poses[:, 2] = xy, CAMERA_HEIGHT
        poses[:, 5], poses[:, 6] = np.sin(yaw / 2), np.cos(yaw / 2)
        start = int(EPOCH * 1e9) + (0 if kind == "map" else 86_400 * 10 ** 9)
        return Trajectory(start + np.round(phi * FRAME_PERIOD_NS).astype(np.int64), poses)

    def traffic(self, kind: str, conditions: Sequence[str], t: float) -> list[Mover]:
        """Vehicles and pedestrians at time t (s) of a drive; they differ between drives and move on their own."""
        key = (kind, tuple(sorted(parse_conditions(conditions))))
        if key not in self._traffic:
            rng = np.random.default_rng([self.seed, zlib.crc32("|".join((kind,) + key[1]).encode())])
            rows = []
            specs = [("car", 1, LANE, 9.0), ("car", -1, -LANE, 9.0), ("car", 1, -ROAD_HALF + 1.0, 0.0),
                     ("car", 1, ROAD_HALF - 1.0, 0.0), ("person", 1, ROAD_HALF + 1.0, 1.4),
                     ("person", -1, -ROAD_HALF - 2.0, 1.4)]
            for mk, direction, lateral, speed in specs:
                for _ in range(int(self.route_length / (45 if mk == "car" else 30))):
                    colour = tuple(float(c) for c in (_VIVID[rng.integers(len(_VIVID))] if rng.random() < 0.6
                                                      else _WALL_COLOURS[rng.integers(14)]))
                    size = (rng.uniform(3.8, 4.8), rng.uniform(1.7, 1.9), rng.uniform(1.35, 1.6)) if mk == "car" \
                        else (0.5, 0.5, rng.uniform(1.55, 1.9))
                    rows.append((mk, rng.uniform(0, self.route_length), direction * speed * rng.uniform(0.7, 1.3),
                                 lateral + rng.uniform(-0.5, 0.5) * (mk == "person"), direction, size, colour))
            self._traffic[key] = rows
        rows = self._traffic[key]
        pos, tan = self._route.at(np.array([r[1] + r[2] * t for r in rows]))
        out = []
        for r, p, tg in zip(rows, pos, tan):
            xy = p + r[3] * np.array([-tg[1], tg[0]])
            yaw = math.atan2(tg[1], tg[0]) + (math.pi if r[4] < 0 else 0.0)
            out.append(Mover(r[0], float(xy[0]), float(xy[1]), yaw, *r[5], r[6]))
        return out

    # ---------------------------------------------------------------- rendering
    def render(self, x: float, y: float, yaw: float, conditions: str | Sequence[str] = ("day",),
               size: tuple[int, int] = (480, 640), rng: np.random.Generator | None = None,
               movers: Sequence[Mover] | None = None) -> np.ndarray:
        """RGB uint8 image (size = (height, width)) seen from (x, y) at camera height looking along yaw.

        `rng` drives the per-image randomness (rain streaks, sensor noise); without it the image is a pure
        function of the arguments. `movers` are drawn as extra occluders (see `traffic`).
        """
        cond = set(parse_conditions(conditions))
        if rng is None:
            rng = np.random.default_rng([self.seed, zlib.crc32(f"{x:.4f} {y:.4f} {yaw:.5f} {size}".encode())])
        cam = _Camera(float(x), float(y), float(yaw), int(size[0]), int(size[1]))
        H, W, f, cy = cam.h, cam.w, cam.f, cam.cy
        night, dusk = "night" in cond, "dusk" in cond and "night" not in cond
        overcast = bool(cond & {"winter", "fog", "rain"})
        season = "winter" if "winter" in cond else "autumn" if "autumn" in cond else "summer"

        # walls: per column the LAYERS nearest front-facing hits, painted far to near
        t, wid, u = self._cast(cam)
        valid = wid >= 0
        w_ = np.where(valid, wid, 0)
        depth = np.where(valid, t, 1e9)
        height = np.where(valid, self._wH[w_], 0.0)
        top, bottom = cy - f * (height - CAMERA_HEIGHT) / depth, cy + f * CAMERA_HEIGHT / depth
        # Walls stand on the ground, so a nearer wall hides everything of a farther one below its own top:
        # each layer shows in one row interval [start, end) and the intervals are disjoint -> a cumulative sum.
        start = np.where(valid, np.clip(np.floor(top - 0.5) + 1, 0, H), H).astype(np.int64)
        end = np.where(valid, np.clip(np.ceil(bottom - 0.5), 0, H), H).astype(np.int64)
        marks = np.zeros((H + 1, W), np.int32)
        cols, cut = np.arange(W), np.full(W, H)
        for k in range(LAYERS):
            stop = np.maximum(np.minimum(end[k], cut), start[k])
            marks[start[k], cols] += k - LAYERS
            marks[stop, cols] -= k - LAYERS
            cut = np.minimum(cut, start[k])
        layer = LAYERS + np.cumsum(marks[:H], axis=0, dtype=np.int32)
        flat = layer * W + np.arange(W, dtype=np.int32)
        wall = layer < LAYERS
        cos_inc = np.abs((cam.dirs[None] * self._wN[w_]).sum(-1)) / np.linalg.norm(cam.dirs, axis=1)
        foot = depth / f * PPM / np.sqrt(np.maximum(cos_inc, 0.15))
        lvl = np.clip(np.floor(np.log2(np.maximum(foot, 1e-6)) + 0.5), 0, 2).astype(int)
        ox, oy, sc = self._atlas_mip[lvl].transpose(2, 0, 1)
        shade = self._wShade[w_] if not overcast else 0.85 + 0.15 * self._wShade[w_]

        def per_pixel(a: np.ndarray, fill: float = 0.0) -> np.ndarray:
            return np.take(np.vstack([a, np.full((1, W), fill)]).astype(np.float32).ravel(), flat)

        ax = per_pixel((self._wTex[w_, 0] + u * PPM) * sc + ox)
        ay = per_pixel((self._wTex[w_, 1] + (height - CAMERA_HEIGHT - cy * depth / f) * PPM) * sc + oy) + \
            cam.rc[:, None] * per_pixel(depth * PPM / f * sc)
        tex = cv2.remap(self._atlas, ax, ay, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
        zbuf = per_pixel(depth, np.inf)

        # ground below the horizon, by inverse perspective
        h2 = int(math.floor(cy - 0.5)) + 1
        tg = f * CAMERA_HEIGHT / (cam.rc[h2:].astype(np.float64) - cy)
        gl = np.clip(np.floor(np.log2(np.sqrt(tg ** 3 / (f * f * CAMERA_HEIGHT)) / GROUND_RES) + 0.5), 0, 2)
        gox, goy, gsc = self._ground_mip[gl.astype(int)].T
        rel = (np.array([cam.x, cam.y]) - self._origin) / GROUND_RES
        gx = (rel[0] * gsc + gox)[:, None] + (tg / GROUND_RES * gsc)[:, None] * cam.dirs[:, 0]
        gy = (rel[1] * gsc + goy)[:, None] + (tg / GROUND_RES * gsc)[:, None] * cam.dirs[:, 1]
        gtex = cv2.remap(self._ground, gx.astype(np.float32), gy.astype(np.float32), cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=(95, 120, 65, 230))
        # Per-channel work goes through OpenCV: numpy broadcasting over a trailing axis of 3 is several
        # times slower, and this loop must stay above 20 images/s on one core.
        base = cv2.cvtColor(tex, cv2.COLOR_RGBA2RGB)
        open_ground = (~wall[h2:]).view(np.uint8)
        cv2.copyTo(cv2.cvtColor(gtex, cv2.COLOR_RGBA2RGB), open_ground, base[h2:])
        img = base.astype(np.float32)
        cv2.multiply(img, _rgb(per_pixel(shade, 0.8 if "rain" in cond else 1.0)), dst=img)  # wet ground: darker
        cv2.copyTo(np.broadcast_to(tg[:, None].astype(np.float32), open_ground.shape).copy(), open_ground,
                   zbuf[h2:])
        if season != "summer":                              # snow or fallen leaves where the ground collects them
            cov = gtex[..., 3].astype(np.float32) * (1 / 255) * open_ground
            lower = img[h2:]
            if season == "winter":
                snow = _rgb(np.clip((cov - 0.12) * 3.0, 0, 1))
                cv2.multiply(lower, 1 - snow, dst=lower)
                cv2.add(lower, cv2.multiply(snow, (232, 235, 242, 0)), dst=lower)
            else:
                leaves = cv2.multiply(_rgb(np.clip((cov - 0.4) * 2.0, 0, 1)), (0.35, -0.05, -0.55, 0))
                cv2.multiply(lower, cv2.add(leaves, (1, 1, 1, 0)), dst=lower)
        if season == "winter":                              # snow on the roof edges
            with np.errstate(invalid="ignore"):
                v = CAMERA_HEIGHT + (cy - cam.rc[:, None]) * zbuf / f
            img[wall & (v > per_pixel(height) - 0.35)] = 235

        glows = self._paint_props(img, zbuf, cam, season, movers or (), night or dusk)

        # lighting: ambient tint, street lights and lit windows in the dark, then the sky
        tint = np.float32([0.09, 0.10, 0.15] if night else [0.7, 0.52, 0.45] if dusk else [1, 1, 1])
        tint *= np.float32((0.75 if "rain" in cond else 1.0) * (np.array([0.92, 0.96, 1.05]) if season == "winter"
                                                                  else np.array([1.05, 0.98, 0.9])
                                                                  if season == "autumn" else 1.0))
        lit = img
        if night or dusk:
            lamp = cv2.multiply(_rgb(self._lamp_light(cam, zbuf)), tuple(np.array([1.0, 0.8, 0.55, 0]) *
                                                                          (1.0 if night else 0.35)))
            cv2.multiply(lit, cv2.add(lamp, tuple(tint.tolist()) + (0,)), dst=lit)
            thr = 140 if night else 215
            alpha = tex[..., 3]
            idx = np.flatnonzero((alpha > thr) & wall)       # lit windows are few: work on them only
            rows = lit.reshape(-1, 3)
            weight = np.clip((alpha.ravel()[idx].astype(np.float32) - thr) / 30.0, 0, 1)[:, None]
            glow = np.float32([255, 205, 140]) * (0.85 if night else 0.5)
            rows[idx] += weight * (glow - rows[idx] * (0.7 if night else 0.3))
        else:
            cv2.multiply(lit, tuple(tint.tolist()) + (0,), dst=lit)
        cv2.copyTo(self._sky_image(cam, night, dusk, overcast), np.isinf(zbuf[:h2]).view(np.uint8), lit[:h2])
        for gx_, gy_, gz_, radius, colour in glows:
            self._glow(lit, zbuf, cam, gx_, gy_, gz_, radius, colour)

        # weather
        if "fog" in cond:
            fog = np.float32([25, 27, 33] if night else [160, 130, 120] if dusk else [200, 202, 206])
            clear = _rgb(np.exp(zbuf * np.float32(-1 / 30.0)))
            cv2.multiply(lit, clear, dst=lit)
            cv2.add(lit, cv2.multiply(1 - clear, tuple(fog.tolist()) + (0,)), dst=lit)
        if "rain" in cond:
            cv2.addWeighted(lit, 0.6, _rgb(cv2.cvtColor(lit, cv2.COLOR_RGB2GRAY)), 0.4, 0, dst=lit)
            cv2.GaussianBlur(lit, (3, 3), 0.8, dst=lit)
            streaks = np.zeros((H, W), np.uint8)
            n = int(H * W / 400)
            p0 = np.stack([rng.uniform(0, W, n), rng.uniform(-H * 0.1, H, n)], 1)
            p1 = p0 + rng.uniform(0.03, 0.09, n)[:, None] * H * np.array([0.25, 1.0])
            cv2.polylines(streaks, list(np.stack([p0, p1], 1).astype(np.int32)), False, 255, 1)
            cv2.add(lit, (50, 50, 50, 0), dst=lit, mask=streaks)
        if night or "rain" in cond:
            cv2.scaleAdd(_noise_tile(H, W, rng), 5.0 if night else 3.0, lit, dst=lit)
        return np.clip(lit, 0, 255, out=lit).astype(np.uint8)

    def _cast(self, cam: _Camera) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(LAYERS, W) arrays: depth, wall index (-1 = none), u (metres along the wall) of the nearest hits."""
        p = np.array([cam.x, cam.y])
        ap, bp = self._wA - p, self._wB - p
        facing = (-ap * self._wN).sum(1) > 0                  # camera on the outer side: back faces dropped
        ahead = (ap @ cam.fwd > 0.05) | (bp @ cam.fwd > 0.05)
        near = np.minimum(np.hypot(*ap.T), np.hypot(*bp.T)) < FAR + self._wLen
        idx = np.nonzero(facing & ahead & near)[0]
        W = cam.w
        if len(idx) == 0:
            return np.full((LAYERS, W), np.inf), np.full((LAYERS, W), -1), np.zeros((LAYERS, W))
        e = (self._wB - self._wA)[idx]
        a = ap[idx]
        dx, dy = cam.dirs[:, :1], cam.dirs[:, 1:]
        with np.errstate(divide="ignore", invalid="ignore"):
            denom = dx * e[:, 1] - dy * e[:, 0]
            t = (a[:, 0] * e[:, 1] - a[:, 1] * e[:, 0]) / denom
            s = (dy * a[:, 0] - dx * a[:, 1]) / denom
            t = np.where((t > 0.1) & (s >= 0) & (s <= 1), t, np.inf)
        if t.shape[1] < LAYERS:
            t = np.hstack([t, np.full((W, LAYERS - t.shape[1]), np.inf)])
            s = np.hstack([s, np.zeros((W, LAYERS - s.shape[1]))])
            idx = np.concatenate([idx, np.full(LAYERS, -1)])
        part = np.argpartition(t, LAYERS - 1, axis=1)[:, :LAYERS]
        pt = np.take_along_axis(t, part, 1)
        order = np.argsort(pt, axis=1)
        part, pt = np.take_along_axis(part, order, 1), np.take_along_axis(pt, order, 1)
        hit = np.isfinite(pt)
        wid = np.where(hit, idx[part], -1)
        u = np.take_along_axis(s, part, 1) * self._wLen[np.where(hit, wid, 0)]
        return pt.T, wid.T, np.where(hit, u, 0).T

    def _paint_props(self, img: np.ndarray, zbuf: np.ndarray, cam: _Camera, season: str,
                     movers: Sequence[Mover], dark: bool) -> list[tuple]:
        """Paint cylinders (trees, poles, people) and boxes (cars) through the depth buffer; returns glows."""
        glows: list[tuple] = []
        P = self._props
        rel = P[:, :2] - (cam.x, cam.y)
        zc, xc = rel @ cam.fwd, rel @ cam.right
        keep = (zc > 0.2 - P[:, _R]) & (zc < PROP_RANGE + P[:, _R]) & \
            (np.abs(xc) < zc * cam.w / (2 * cam.f) + P[:, _R] + 1)
        for row, z_, x_ in zip(P[keep], zc[keep], xc[keep]):
            kind = int(row[_KIND])
            colour = row[_RGB]
            if kind == CROWN:
                pal = _LEAVES[season]
                colour = np.array(pal[int(row[_VAR] * len(pal))], np.float32)
            self._cylinder(img, zbuf, cam, z_, x_, row[_R], row[_Z0], row[_Z1], kind, colour, row[_VAR], season)
            if kind == LAMP and dark:
                glows.append((row[_X], row[_Y], row[_Z0], 0.6, (255, 200, 120)))
        for m in movers:
            z_, x_ = cam.to_cam(m.x, m.y)
            if math.hypot(z_, x_) < 6.0 or z_ < -m.length or z_ > PROP_RANGE:
                continue                                 # never drive through a car or a person
            if m.kind == "person":
                self._cylinder(img, zbuf, cam, z_, x_, m.width / 2, 0.0, m.height, PERSON, np.array(m.colour),
                               (m.x * 7.13) % 1.0, season)
            else:
                self._box(img, zbuf, cam, m)
                if dark:
                    fwd = np.array([math.cos(m.yaw), math.sin(m.yaw)])
                    lights = ((m.length / 2, (255, 250, 230), 0.4), (-m.length / 2, (255, 40, 30), 0.25))
                    for along, col, rad in lights:
                        for side in (-0.6, 0.6):
                            q = np.array([m.x, m.y]) + fwd * along + np.array([-fwd[1], fwd[0]]) * side
                            glows.append((q[0], q[1], 0.7, rad, col))
        return glows

    def _cylinder(self, img, zbuf, cam: _Camera, zc: float, xc: float, r: float, z0: float, z1: float,
                  kind: int, colour: np.ndarray, var: float, season: str) -> None:
        """Paint one vertical cylinder (a crown is a sphere-like one with leafy holes) where it is nearest."""
        r = max(r, 0.6 * zc / cam.f)                     # at least about one pixel wide
        near = zc - r
        if near < 0.15:
            return
        inv = (1 / near, 1 / (zc + r))                   # screen bounds: extremes over the nearest/farthest depth
        c0 = max(0, math.floor(cam.cx + cam.f * min((xc - 1.5 * r) * i for i in inv)))
        c1 = min(cam.w, math.ceil(cam.cx + cam.f * max((xc + 1.5 * r) * i for i in inv)) + 1)
        r0 = max(0, math.floor(cam.cy - cam.f * max((z1 - CAMERA_HEIGHT) * i for i in inv)))
        r1 = min(cam.h, math.ceil(cam.cy - cam.f * min((z0 - CAMERA_HEIGHT) * i for i in inv)) + 1)
        if c1 <= c0 or r1 <= r0:
            return
        sub_z = zbuf[r0:r1, c0:c1]
        if near > sub_z.max():                           # hidden behind walls or nearer props
            return
        xr = cam.xr[c0:c1]
        q = 1 + xr * xr
        tstar = (zc + xr * xc) / q                       # ray-circle intersection, rays have forward component 1
        d2 = zc * zc + xc * xc - tstar * tstar * q
        hit = d2 < r * r
        t_hit = tstar - np.sqrt(np.maximum(r * r - d2, 0) / q)
        t = np.where(hit, t_hit, np.inf).astype(np.float32)
        v = CAMERA_HEIGHT + (cam.cy - cam.rc[r0:r1, None]) * (np.where(hit, t_hit, near) / cam.f)
        hx, hy = t_hit - zc, xr * t_hit - xc             # hit point minus centre, camera frame (fwd, right)
        shade = 0.6 + 0.4 * np.clip((hx * (self._sun @ cam.fwd) + hy * (self._sun @ cam.right)) / r, 0, 1)
        col = (colour[None] * shade[:, None]).astype(np.float32)
        if kind == CROWN:
            half = (z1 - z0) / 2 * np.sqrt(np.maximum(1 - d2 / (r * r), 0))
            mask = (np.abs(v - (z0 + z1) / 2) <= half) & (t < sub_z)
            k = min(40.0, max(8.0, cam.f / (2.5 * zc)))    # leaf cells per metre: about 2-3 pixels when near
            arc = (np.arctan2(hy, hx) * r * k).astype(np.int64) + int(var * 997)
            leaf = _LEAF_NOISE[(v * k).astype(np.int64) & 255, arc[None] & 255]
            mask &= leaf > (0.82 if season == "winter" else 0.3)
            col = col[None] * (0.55 + 0.7 * leaf[..., None])
        else:
            mask = (v >= z0) & (v <= z1) & (t < sub_z)
            if kind == PERSON:                           # legs, shirt (the prop colour), face
                legs = np.float32([(40, 45, 70), (30, 30, 30), (90, 80, 60)][int(var * 3)])
                col = np.where((v < 0.85 * z1)[..., None], col[None], np.float32([220, 180, 150]) * shade[:, None])
                col = np.where((v < 0.48 * z1)[..., None], legs * shade[:, None], col)
        np.copyto(img[r0:r1, c0:c1], col, where=mask[..., None])
        np.copyto(sub_z, t[None], where=mask)

    def _box(self, img, zbuf, cam: _Camera, m: Mover) -> None:
        fwd = np.array([math.cos(m.yaw), math.sin(m.yaw)])
        left = np.array([-fwd[1], fwd[0]])
        centre = np.array([m.x, m.y])
        corners = np.array([centre + a * fwd * m.length / 2 + b * left * m.width / 2
                            for a, b in ((1, 1), (-1, 1), (-1, -1), (1, -1))])
        zs = [cam.to_cam(*c) for c in corners]
        if min(z for z, _ in zs) < 0.3:
            return
        cols = [cam.cx + cam.f * x / z for z, x in zs]
        c0, c1 = int(max(0, math.floor(min(cols)))), int(min(cam.w, math.ceil(max(cols)) + 1))
        if c1 <= c0:
            return
        p = np.array([cam.x, cam.y])
        dirs = cam.dirs[c0:c1]
        best_t = np.full(c1 - c0, np.inf)
        best_s = np.zeros(c1 - c0)
        for i in range(4):
            a, b = corners[i], corners[(i + 1) % 4]
            e, ap = b - a, a - p
            if (ap @ np.array([e[1], -e[0]])) > 0:       # back face (outward normal points away from camera)
                continue
            with np.errstate(divide="ignore", invalid="ignore"):
                den = dirs[:, 0] * e[1] - dirs[:, 1] * e[0]
                t = (ap[0] * e[1] - ap[1] * e[0]) / den
                s = (dirs[:, 1] * ap[0] - dirs[:, 0] * ap[1]) / den
            ok = (s >= 0) & (s <= 1) & (t > 0) & (t < best_t)
            best_t = np.where(ok, t, best_t)
            best_s = np.where(ok, s, best_s)
        if not np.isfinite(best_t).any():
            return
        lo_t, hi_t = best_t[np.isfinite(best_t)].min(), best_t[np.isfinite(best_t)].max()
        r0 = max(0, math.floor(cam.cy - cam.f * (m.height - CAMERA_HEIGHT) / (lo_t if m.height > CAMERA_HEIGHT
                                                                                else hi_t)))
        r1 = int(min(cam.h, math.ceil(cam.cy + cam.f * CAMERA_HEIGHT / lo_t) + 1))
        v = CAMERA_HEIGHT + (cam.cy - cam.rc[r0:r1, None]) * best_t / cam.f
        sub_z = zbuf[r0:r1, c0:c1]
        mask = (v >= 0.15) & (v <= m.height) & (best_t < sub_z)
        body = np.array(m.colour, np.float32)
        glass = (v > m.height * 0.62) & (best_s > 0.12)[None] & (best_s < 0.88)[None]
        col = np.where(glass[..., None], np.array([45, 55, 65], np.float32), body)
        col = np.where((v < 0.4)[..., None], np.array([25, 25, 28], np.float32), col)
        np.copyto(img[r0:r1, c0:c1], col, where=mask[..., None])
        np.copyto(sub_z, best_t.astype(np.float32)[None], where=mask)

    def _lamp_light(self, cam: _Camera, zbuf: np.ndarray) -> np.ndarray:
        """Street-light intensity per pixel from the light map at the pixel's ground/wall foot point."""
        depth = np.where(np.isfinite(zbuf), zbuf, np.float32(0))     # sky pixels get replaced later anyway
        d = (cam.dirs / LIGHT_RES).astype(np.float32)
        o = (np.array([cam.x, cam.y]) - self._origin) / LIGHT_RES
        light = cv2.remap(self._light, np.float32(o[0]) + depth * d[:, 0], np.float32(o[1]) + depth * d[:, 1],
                          cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
        v = CAMERA_HEIGHT + (np.float32(cam.cy) - cam.rc[:, None]) * depth * np.float32(1 / cam.f)
        return light * np.clip(np.float32(1.2) - v * np.float32(1 / 8), 0, 1)

    def _sky_image(self, cam: _Camera, night: bool, dusk: bool, overcast: bool) -> np.ndarray:
        key = (night, dusk, overcast)
        if key not in self._sky_rgb:                      # colour the panorama once per palette
            zen, hor, cloud, skyline = ((5, 8, 22), (30, 32, 50), (28, 28, 36), (14, 14, 22)) if night else \
                ((45, 55, 115), (250, 150, 90), (230, 140, 120), (70, 55, 75)) if dusk else \
                ((70, 130, 215), (180, 208, 238), (245, 245, 248), (150, 165, 185))
            pal = np.array([zen, hor, cloud, skyline], np.float32)
            if overcast:
                pal = 0.3 * pal + 0.7 * pal.mean(1, keepdims=True) * (1.0 if night else 1.1)
            g = np.linspace(0, 1, self._sky.shape[0], dtype=np.float32)[:, None, None] ** 2
            base = pal[0] * (1 - g) + pal[1] * g
            base = base + (pal[2] - base) * (self._sky[..., :1] / 255 * (0.6 if overcast else 1.0))
            base = base + (pal[3] - base) * (self._sky[..., 1:] / 255)
            self._sky_rgb[key] = np.clip(base, 0, 255).astype(np.float32)
        h2 = int(math.floor(cam.cy - 0.5)) + 1
        sh, sw = self._sky.shape[0], self._sky.shape[1] - 1
        el = np.arctan((cam.cy - cam.rc[:h2]) / cam.f)
        sx = np.mod((cam.yaw - np.arctan(cam.xr)) / (2 * np.pi) * sw, sw).astype(np.float32)
        sy = np.clip((1 - el / (np.pi / 4)) * (sh - 1), 0, sh - 1).astype(np.float32)
        return cv2.remap(self._sky_rgb[key], np.repeat(sx[None], h2, 0), np.repeat(sy[:, None], cam.w, 1),
                         cv2.INTER_LINEAR)

    @staticmethod
    def _glow(img: np.ndarray, zbuf: np.ndarray, cam: _Camera, x: float, y: float, z: float, radius: float,
              colour) -> None:
        zc, xc = cam.to_cam(x, y)
        if zc < 0.5 or zc > 120:
            return
        u, v = cam.cx + cam.f * xc / zc, cam.cy - cam.f * (z - CAMERA_HEIGHT) / zc
        if not (0 <= u < cam.w and 0 <= v < cam.h) or zbuf[int(v), int(u)] < zc - 1.0:
            return
        sigma = max(1.0, cam.f * radius / zc)
        c0, c1 = int(max(0, u - 3 * sigma)), int(min(cam.w, u + 3 * sigma + 1))
        r0, r1 = int(max(0, v - 3 * sigma)), int(min(cam.h, v + 3 * sigma + 1))
        dx = (np.arange(c0, c1) + 0.5 - u) / sigma
        dy = (np.arange(r0, r1) + 0.5 - v) / sigma
        g = np.exp(-0.5 * (dy[:, None] ** 2 + dx[None] ** 2)).astype(np.float32)
        img[r0:r1, c0:c1] += g[..., None] * np.array(colour, np.float32)

    # ---------------------------------------------------------------- drives
    def drive(self, kind: str = "map", conditions: str | Sequence[str] = ("day",), frames: int = 100,
              size: tuple[int, int] = (480, 640), spacing: float | None = None) -> Iterator[Frame]:
        """Render a drive along the loop (see `trajectory`), with its own traffic, at 10 Hz stamps."""
        conditions = parse_conditions(conditions)
        traj = self.trajectory(kind, frames, spacing)
        code = zlib.crc32(f"{kind}|{','.join(sorted(conditions))}".encode())
        for i, (ns, pose) in enumerate(zip(traj.stamps_ns, traj.poses)):
            yaw = 2 * math.atan2(pose[5], pose[6])
            movers = self.traffic(kind, conditions, (ns - traj.stamps_ns[0]) / 1e9)
            image = self.render(pose[0], pose[1], yaw, conditions, size,
                                rng=np.random.default_rng([self.seed, code, i]), movers=movers)
            yield Frame(float(ns) / 1e9, pose.copy(), image)


def _stamp_name(ns: int) -> str:
    """'%.6f' of the stamp, from integer nanoseconds so no float rounding can creep in."""
    return f"{ns // 10**9}.{ns % 10**9 // 1000:06d}"


def write_drive(world_or_seed: SyntheticWorld | int, out_dir: str | Path, kind: str = "map",
                conditions: str | Sequence[str] = ("day",), frames: int = 100, size: tuple[int, int] = (480, 640),
                bag: bool = False, compressed: bool = False, storage: str = "sqlite3",
                spacing: float | None = None, progress: bool = False) -> Path:
    """Render a drive to `out_dir`; returns `out_dir`.

    Without `bag`: `images/<stamp>.png` (the stem parses as the stamp) and `poses.txt` (TUM:
    `timestamp tx ty tz qx qy qz qw`). With `bag`: a rosbag2 directory `bag/` holding `/camera/image_raw`
    (sensor_msgs/Image rgb8) or, with `compressed`, `/camera/image_raw/compressed` (JPEG), plus `/odom`
    (nav_msgs/Odometry, ground truth at twice the camera rate), and `poses.txt` beside it.
    """
    from tqdm import tqdm

    world = world_or_seed if isinstance(world_or_seed, SyntheticWorld) else SyntheticWorld(int(world_or_seed))
    conditions = parse_conditions(conditions)
    if storage not in ("sqlite3", "mcap"):
        raise ValueError(f"storage must be 'sqlite3' or 'mcap', not {storage!r}")
    if compressed and not bag:
        raise ValueError("compressed images are only written into a bag (bag=True)")
    out = Path(out_dir)
    for target in (out / "bag", out / "poses.txt") + (() if bag else (out / "images",)):
        if target.exists() and (target.is_file() or any(target.iterdir())):
            raise FileExistsError(f"{target} already exists; choose an empty output directory")
    out.mkdir(parents=True, exist_ok=True)
    if bag and (out / "bag").is_dir():
        (out / "bag").rmdir()                            # empty (checked above); the bag writer creates it
    traj = world.trajectory(kind, frames, spacing)
    odom = world.trajectory(kind, frames, spacing, substeps=2)
    writer = _BagWriter(out / "bag", storage, compressed, odom) if bag else None
    if not bag:
        (out / "images").mkdir(exist_ok=True)
    try:
        drive = world.drive(kind, conditions, frames, size, spacing)
        for i, frame in enumerate(tqdm(drive, total=frames, unit="img", desc=f"synth {kind}", disable=None if progress else True)):
            ns = int(traj.stamps_ns[i])
            if writer:
                writer.frame(i, ns, frame.image)
            else:
                bgr = cv2.cvtColor(frame.image, cv2.COLOR_RGB2BGR)
                cv2.imwrite(str(out / "images" / f"{_stamp_name(ns)}.png"), bgr)
    finally:
        if writer:
            writer.close()
    lines = ["# timestamp tx ty tz qx qy qz qw"]
    lines += [f"{_stamp_name(int(ns))} " + " ".join(f"{v:.9f}" for v in pose)
              for ns, pose in zip(traj.stamps_ns, traj.poses)]
    (out / "poses.txt").write_text("\n".join(lines) + "\n")
    log.info("synthetic drive written", extra={"path": str(out), "kind": kind, "frames": frames,
                                               "conditions": ",".join(conditions), "bag": bag})
    return out


class _BagWriter:
    """rosbag2 output: camera images at the frame stamps, odometry at frame stamps and half-way between."""

    def __init__(self, path: Path, storage: str, compressed: bool, odom: Trajectory):
        from rosbags.rosbag2 import StoragePlugin, Writer
        from rosbags.typesys import Stores, get_typestore

        self.ts = get_typestore(Stores.ROS2_KILTED)
        self.compressed, self.odom = compressed, odom
        plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
        self.writer = Writer(path, version=9, storage_plugin=plugin)
        self.writer.open()
        self.image_type = "sensor_msgs/msg/CompressedImage" if compressed else "sensor_msgs/msg/Image"
        topic = "/camera/image_raw/compressed" if compressed else "/camera/image_raw"
        self.image_conn = self.writer.add_connection(topic, self.image_type, typestore=self.ts)
        self.odom_conn = self.writer.add_connection("/odom", "nav_msgs/msg/Odometry", typestore=self.ts)

    def _header(self, ns: int, frame_id: str):
        T = self.ts.types
        return T["std_msgs/msg/Header"](stamp=T["builtin_interfaces/msg/Time"](sec=ns // 10**9, nanosec=ns % 10**9),
                                        frame_id=frame_id)

    def frame(self, i: int, ns: int, image: np.ndarray) -> None:
        T = self.ts.types
        self._odom(2 * i)
        if self.compressed:
            ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
            msg = T[self.image_type](header=self._header(ns, "camera"), format="jpeg", data=jpg.ravel())
        else:
            h, w = image.shape[:2]
            msg = T[self.image_type](header=self._header(ns, "camera"), height=h, width=w, encoding="rgb8",
                                     is_bigendian=0, step=w * 3, data=np.ascontiguousarray(image).ravel())
        self.writer.write(self.image_conn, ns, self.ts.serialize_cdr(msg, self.image_type))
        if 2 * i + 1 < len(self.odom.poses):
            self._odom(2 * i + 1)

    def _odom(self, k: int) -> None:
        T = self.ts.types
        ns, p = int(self.odom.stamps_ns[k]), self.odom.poses
        a, b = max(k - 1, 0), min(k + 1, len(p) - 1)
        dt = max((self.odom.stamps_ns[b] - self.odom.stamps_ns[a]) / 1e9, 1e-9)
        yaw = 2 * np.arctan2(p[:, 5], p[:, 6])
        vel = (p[b, :2] - p[a, :2]) / dt
        forward = float(vel @ (math.cos(yaw[k]), math.sin(yaw[k]))) if b > a else 0.0
        lateral = float(vel @ (-math.sin(yaw[k]), math.cos(yaw[k]))) if b > a else 0.0
        spin = math.remainder(yaw[b] - yaw[a], 2 * math.pi) / dt if b > a else 0.0
        V3, Cov = T["geometry_msgs/msg/Vector3"], np.zeros(36)
        pose = T["geometry_msgs/msg/Pose"](position=T["geometry_msgs/msg/Point"](x=p[k, 0], y=p[k, 1], z=p[k, 2]),
                                           orientation=T["geometry_msgs/msg/Quaternion"](x=p[k, 3], y=p[k, 4],
                                                                                        z=p[k, 5], w=p[k, 6]))
        twist = T["geometry_msgs/msg/Twist"](linear=V3(x=forward, y=lateral, z=0.0), angular=V3(x=0.0, y=0.0, z=spin))
        msg = T["nav_msgs/msg/Odometry"](header=self._header(ns, "map"), child_frame_id="base_link",
                                         pose=T["geometry_msgs/msg/PoseWithCovariance"](pose=pose, covariance=Cov),
                                         twist=T["geometry_msgs/msg/TwistWithCovariance"](twist=twist,
                                                                                          covariance=Cov.copy()))
        self.writer.write(self.odom_conn, ns, self.ts.serialize_cdr(msg, "nav_msgs/msg/Odometry"))

    def close(self) -> None:
        self.writer.close()
