"""The synthetic world's geometry: a procedural city loop, its drives and its traffic.

Everything is derived from one seed: a smooth closed road (straight streets, rounded corners), textured
buildings on both sides in two rows (`facades`), trees, street lamps and signs on the sidewalks, a ground
raster and a sky panorama. Drives follow the road in the right lane (map) or with a lateral offset and yaw
jitter (query); vehicles and pedestrians move on their own. Images are rendered by `render.Renderer`.

Conventions: world x/y in metres, z up; a pose's yaw is about +z and yaw = 0 looks along +x (the camera's
body frame: x forward, y left, z up); image columns grow to the camera's right. `Frame.pose` is
(x, y, z, qx, qy, qz, qw) with z = camera height.
"""
from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from ..errors import ConfigError
from .facades import Canvas, draw_facade, new_style
from .render import Renderer
from .scene import (
    CAMERA_HEIGHT,
    CROWN,
    GROUND_RES,
    LAMP,
    LANE,
    LIGHT_RES,
    PLAIN,
    ROAD_HALF,
    SIDEWALK,
    SIGN,
    VIVID,
    WALL_COLOURS,
    Mover,
    parse_conditions,
)

log = logging.getLogger(__name__)

EPOCH = 1_700_000_000.0
FRAME_PERIOD_NS = 100_000_000             # 10 Hz
DEFAULT_SPACING = 2.0                     # metres between frames when none is given
MAX_QUERY_OFFSET = 2.0                    # metres, lateral, query drive relative to the map drive
MAX_QUERY_YAW = math.radians(15.0)


@dataclass
class Frame:
    """One rendered image of a drive with its ground-truth camera pose."""
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


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cell: float) -> np.ndarray:
    small = rng.random((max(2, int(shape[0] / cell) + 2), max(2, int(shape[1] / cell) + 2))).astype(np.float32)
    return cv2.resize(small, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)


def mip(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pack levels 0, 1, 2 of a pyramid into one image; returns it and rows (offset_x, offset_y, scale)."""
    h, w = image.shape[:2]
    l1 = cv2.resize(image, (w // 2, h // 2), interpolation=cv2.INTER_AREA)
    l2 = cv2.resize(l1, (w // 4, h // 4), interpolation=cv2.INTER_AREA)
    out = np.zeros((h + h // 2, w) + image.shape[2:], image.dtype)
    out[:h] = image
    out[h:h + h // 2, :w // 2] = l1
    out[h:h + h // 4, w // 2:w // 2 + w // 4] = l2
    return out, np.array([(0, 0, 1.0), (0, h, 0.5), (w // 2, h, 0.25)], np.float32)



class Route:
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




class SyntheticWorld:
    """A deterministic procedural city loop. The same seed always gives the same geometry and textures.

    What `render.Renderer` draws: walls (`wall_a`/`wall_b` end points, `wall_normal` outward, `wall_height`,
    `wall_length`, `wall_tex` atlas position, `wall_shade`), the facade `atlas`, the `ground` raster (RGB +
    snow/leaf coverage), the `props` table (see `scene.COL_*`), the street-`light` map, the `sky` panorama
    and the `sun` direction; `origin` is the world position of raster texel (0, 0).
    """

    def __init__(self, seed: int, radius: float = 70.0):
        self.seed = int(seed)
        self._traffic: dict[tuple, list] = {}
        rng = np.random.default_rng(self.seed)
        self.route = Route(rng, radius)
        self.sun = np.array([math.cos(a := rng.uniform(0, 2 * np.pi)), math.sin(a)])
        lo = self.route.pts.min(0) - 55                # second-row buildings end about 45 m off the road
        hi = self.route.pts.max(0) + 55
        self.origin = lo
        self._grid = np.ceil((hi - lo) / 0.5).astype(int)          # occupancy raster (0.5 m) for placement
        blocked = np.zeros((self._grid[1], self._grid[0]), np.uint8)
        cv2.polylines(blocked, [self._occ(self.route.pts)], True, 1, int(2 * (ROAD_HALF + SIDEWALK + 0.5) / 0.5))
        self._build_buildings(rng, blocked)
        self._build_props(rng, blocked)
        self._build_ground(rng, hi - lo)
        self._build_sky(rng)
        self.renderer = Renderer(self)
        log.debug("synthetic world", extra={"seed": seed, "route_m": round(self.route_length, 1),
                                            "walls": len(self.wall_a), "props": len(self.props)})

    # ---------------------------------------------------------------- generation
    def _occ(self, pts: np.ndarray) -> np.ndarray:
        return np.round((pts - self.origin) / 0.5).astype(np.int32).reshape(-1, 1, 2)

    def _build_buildings(self, rng: np.random.Generator, blocked: np.ndarray) -> None:
        textures: list[np.ndarray] = []
        walls: list[tuple] = []                        # A, B, outward normal, height, texture index
        style = new_style(rng)
        for side in (1.0, -1.0):
            for setback, (wlo, whi), (hlo, hhi) in ((8.0, (8, 24), (6, 24)), (26.0, (12, 30), (10, 40))):
                s = rng.uniform(0, 6)
                while s < self.route.length:
                    width, depth = rng.uniform(wlo, whi), rng.uniform(8, 16)
                    (pos,), (tan,) = self.route.at(s + width / 2)
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
                        style = new_style(rng)
                    front = Canvas(width, height, style.wall)
                    draw_facade(front, rng, style, front=True)
                    side_tex = Canvas(max(width, depth), height, style.wall * rng.uniform(0.9, 1.05))
                    draw_facade(side_tex, rng, style, front=False)
                    for canvas in (front, side_tex):
                        noise = smooth_noise(rng, canvas.lit.shape, 12)[..., None]
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
        self.atlas, self.atlas_mip = mip(atlas)
        self.wall_a = np.array([w[0] for w in walls])
        self.wall_b = np.array([w[1] for w in walls])
        self.wall_normal = np.array([w[2] for w in walls])
        self.wall_height = np.array([w[3] for w in walls])
        self.wall_length = np.linalg.norm(self.wall_b - self.wall_a, axis=1)
        self.wall_tex = offsets[[w[4] for w in walls]].astype(np.float64)        # atlas x, y of (u=0, v=height)
        self.wall_shade = 0.6 + 0.4 * np.clip(self.wall_normal @ self.sun, 0, 1)

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

        def add(xy: np.ndarray, r: float, z0: float, z1: float, kind: int, colour: Sequence[float]) -> None:
            rows.append([xy[0], xy[1], r, z0, z1, kind, rng.random(), *colour])

        L = self.route.length
        lamps = []
        for s in np.arange(rng.uniform(0, 30), L - 5, 30.0):
            side = 1 if int(s / 30) % 2 else -1
            (p,), (t,) = self.route.at(s)
            n = side * np.array([-t[1], t[0]])
            base = p + n * (ROAD_HALF + 0.4)
            add(base, 0.1, 0, 6.5, PLAIN, (90, 92, 95))
            head = base - n * 0.3
            add(head, 0.25, 6.4, 6.75, LAMP, (60, 60, 62))
            lamps.append(head)
        for start in np.arange(0, L, 50.0):
            for side in (1, -1):
                if rng.random() < 0.55:
                    for s in np.arange(start + rng.uniform(0, 5), start + 50, rng.uniform(7, 12)):
                        (p,), (t,) = self.route.at(s)
                        self._add_tree(add, rng, p + side * np.array([-t[1], t[0]]) * (ROAD_HALF + 1.5))
        for s in rng.uniform(0, L, int(L / 40)):
            side = rng.choice([-1, 1])
            (p,), (t,) = self.route.at(s)
            q = p + side * np.array([-t[1], t[0]]) * (ROAD_HALF + 0.5)
            add(q, 0.05, 0, 2.2, PLAIN, (120, 120, 125))
            add(q, 0.35, 2.2, 2.9, SIGN, VIVID[rng.integers(6)])
        for s in rng.uniform(0, L, int(L / 35)):                     # bins and bollards
            (p,), (t,) = self.route.at(s)
            q = p + rng.choice([-1, 1]) * np.array([-t[1], t[0]]) * (ROAD_HALF + rng.uniform(0.5, 2.8))
            add(q, rng.uniform(0.15, 0.35), 0, rng.uniform(0.8, 1.1), PLAIN, WALL_COLOURS[rng.integers(14)] * 0.6)
        cand = self.origin + rng.random((int(L / 4), 2)) * (self._grid * 0.5)
        for q in cand:                                                # park trees between and behind buildings
            i, j = ((q - self.origin) / 0.5).astype(int)
            if not blocked[max(j - 4, 0):j + 5, max(i - 4, 0):i + 5].any():
                self._add_tree(add, rng, q)
        self.props = np.array(rows, np.float64)
        self.lamps = np.array(lamps)

    @staticmethod
    def _add_tree(add, rng: np.random.Generator, q: np.ndarray) -> None:
        trunk = rng.uniform(2.0, 3.5)
        crown = rng.uniform(1.4, 3.0)
        add(q, rng.uniform(0.12, 0.25), 0, trunk + crown, PLAIN, (85, 65, 50))
        add(q, crown, trunk, trunk + 2 * crown * rng.uniform(0.8, 1.1), CROWN, (0, 0, 0))

    def _build_ground(self, rng: np.random.Generator, extent: np.ndarray) -> None:
        """Top-view ground raster: RGB + 'coverage' (how much snow or leaves a texel collects)."""
        w, h = np.ceil(extent / GROUND_RES).astype(int)
        to_px = lambda pts: np.round((pts - self.origin) / GROUND_RES).astype(np.int32).reshape(-1, 1, 2)  # noqa
        rgb = np.empty((h, w, 3), np.uint8)
        rgb[:] = (95, 120, 65)
        cov = np.full((h, w), 230, np.uint8)
        pts, tan = self.route.pts, self.route.tangent
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
        for s in rng.uniform(0, self.route.length, int(self.route.length / 25)):   # asphalt patches
            (p,), (t,) = self.route.at(s)
            box = cv2.boxPoints(((float(p[0] - self.origin[0]) / GROUND_RES + rng.uniform(-20, 20),
                                  float(p[1] - self.origin[1]) / GROUND_RES + rng.uniform(-20, 20)),
                                 (rng.uniform(10, 40), rng.uniform(10, 30)), rng.uniform(0, 180)))
            cv2.fillPoly(rgb, [box.astype(np.int32)], (int(rng.integers(45, 95)),) * 3)
        for off in (-ROAD_HALF + 0.4, ROAD_HALF - 0.4):                              # edge lines
            cv2.polylines(rgb, [to_px(pts + normal * off)], True, (225, 225, 220), thick(0.08))
        for i in range(0, len(pts) - 3, 6):                                          # dashed centre line
            cv2.line(rgb, tuple(to_px(pts[i:i + 1])[0, 0]), tuple(to_px(pts[i + 3:i + 4])[0, 0]), (230, 210, 120),
                     thick(0.08))
        for off in (LANE - 0.9, LANE + 0.9, -LANE - 0.9, -LANE + 0.9):               # wheel tracks stay clear of snow
            cv2.polylines(cov, [to_px(pts + normal * off)], True, 0, thick(0.3))
        for s in rng.uniform(0, self.route.length, int(self.route.length / 90) + 1):  # zebra crossings
            (p,), (t,) = self.route.at(s)
            n = np.array([-t[1], t[0]])
            for k in np.arange(-ROAD_HALF + 0.5, ROAD_HALF - 0.4, 1.0):
                a, b = p + n * k, p + n * (k + 0.5)
                quad = np.array([a - t * 1.5, b - t * 1.5, b + t * 1.5, a + t * 1.5])
                cv2.fillPoly(rgb, [to_px(quad)], (235, 235, 230))
        shade = 0.8 + 0.4 * smooth_noise(rng, (h, w), 40)
        grain = rng.integers(-12, 13, (h, w), dtype=np.int16)
        rgb = np.clip(rgb * shade[..., None] + grain[..., None], 0, 255).astype(np.uint8)
        cov = np.clip(cov.astype(np.int16) + grain * 3, 0, 255).astype(np.uint8)
        self.ground, self.ground_mip = mip(np.dstack([rgb, cov]))
        light = np.zeros(np.ceil(extent / LIGHT_RES).astype(int)[::-1], np.float32)
        for p in self.lamps:
            i, j = ((p - self.origin) / LIGHT_RES).astype(int)
            light[j, i] += 1.0
        self.light = cv2.GaussianBlur(light, (0, 0), 4.0 / LIGHT_RES) * 2 * np.pi * 16 / LIGHT_RES ** 2

    def _build_sky(self, rng: np.random.Generator) -> None:
        """Panorama (azimuth x elevation 0..45 deg): channel 0 clouds, channel 1 distant skyline."""
        h, w = 128, 1024
        n = 0.65 * smooth_noise(rng, (h, w), 24) + 0.35 * smooth_noise(rng, (h, w), 6)
        clouds = np.clip((n - 0.5) * 3.5, 0, 1) * np.linspace(1, 0.5, h)[:, None]
        skyline = np.zeros((h, w), np.float32)
        x = 0
        while x < w:
            bw = int(rng.integers(4, 24))
            top = h - 1 - int(rng.uniform(0, 4.5) / 45 * h)
            skyline[top:, x:x + bw] = 1
            x += bw
        sky = (np.dstack([clouds, skyline]) * 255).astype(np.uint8)
        self.sky = np.concatenate([sky, sky[:, :1]], 1)              # wrap column for bilinear taps

    # ---------------------------------------------------------------- queries
    @property
    def route_length(self) -> float:
        return self.route.length

    def project(self, x: float, y: float) -> tuple[float, float, float]:
        """(arc length, lateral offset left-positive, road heading) of the route point nearest to (x, y)."""
        return self.route.project(x, y)

    def trajectory(self, kind: str = "map", frames: int = 100, spacing: float | None = None,
                   substeps: int = 1) -> Trajectory:
        """Ground-truth poses of a drive; substeps > 1 adds poses between frames (e.g. 2 for 20 Hz odometry).

        The map drive follows the right lane exactly. The query drive starts between map frames and keeps a
        seed-dependent lateral offset (at most MAX_QUERY_OFFSET) and a slowly varying yaw jitter (at most
        MAX_QUERY_YAW), so it never sees exactly the map's viewpoints.
        """
        if kind not in ("map", "query"):
            raise ConfigError(f"drive kind must be 'map' or 'query', not {kind!r}")
        if frames < 1:
            raise ConfigError(f"frames must be at least 1, not {frames}")
        # Default: 2 m apart (20 m/s at 10 Hz), or closer when that would drive more than once around the loop.
        spacing = min(self.route_length / frames, DEFAULT_SPACING) if spacing is None else float(spacing)
        if spacing <= 0:
            raise ConfigError(f"spacing must be positive, not {spacing}")
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
        pos, tan = self.route.at(s0 + phi_s * spacing)
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
                    colour = tuple(float(c) for c in (VIVID[rng.integers(len(VIVID))] if rng.random() < 0.6
                                                      else WALL_COLOURS[rng.integers(14)]))
                    size = (rng.uniform(3.8, 4.8), rng.uniform(1.7, 1.9), rng.uniform(1.35, 1.6)) if mk == "car" \
                        else (0.5, 0.5, rng.uniform(1.55, 1.9))
                    rows.append((mk, rng.uniform(0, self.route_length), direction * speed * rng.uniform(0.7, 1.3),
                                 lateral + rng.uniform(-0.5, 0.5) * (mk == "person"), direction, size, colour))
            self._traffic[key] = rows
        rows = self._traffic[key]
        pos, tan = self.route.at(np.array([r[1] + r[2] * t for r in rows]))
        out = []
        for r, p, tg in zip(rows, pos, tan):
            xy = p + r[3] * np.array([-tg[1], tg[0]])
            yaw = math.atan2(tg[1], tg[0]) + (math.pi if r[4] < 0 else 0.0)
            out.append(Mover(r[0], float(xy[0]), float(xy[1]), yaw, *r[5], r[6]))
        return out

    # ---------------------------------------------------------------- images
    def render(self, x: float, y: float, yaw: float, conditions: str | Sequence[str] = ("day",),
               size: tuple[int, int] = (480, 640), rng: np.random.Generator | None = None,
               movers: Sequence[Mover] | None = None) -> np.ndarray:
        """RGB uint8 image (size = (height, width)) seen from (x, y) at camera height looking along yaw.

        `rng` drives the per-image randomness (rain streaks, sensor noise); without it the image is a pure
        function of the arguments. `movers` are drawn as extra occluders (see `traffic`).
        """
        return self.renderer.render(x, y, yaw, conditions, size, rng, movers)

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
