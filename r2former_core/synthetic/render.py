"""Rendering of the synthetic world on the CPU: ray casting per image column and painting through a depth buffer.

A pinhole camera 1.5 m above the road: a 2D ray per column against the wall segments (the 3 nearest
front-facing hits, so taller buildings show above nearer ones), textured ground by inverse perspective,
a panoramic sky; props and vehicles are painted through a depth buffer. All textures (facades, ground,
sky) are sampled with `cv2.remap` from small mip pyramids so far facades do not shimmer. Conditions change
the lighting (dusk, night with street lamps and lit windows), the season (snow, autumn leaves) and the
weather (fog, rain streaks), and add sensor noise.
"""
from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np

from .scene import (
    CAMERA_HEIGHT,
    COL_KIND,
    COL_R,
    COL_RGB,
    COL_VAR,
    COL_X,
    COL_Y,
    COL_Z0,
    COL_Z1,
    CROWN,
    GROUND_RES,
    HFOV_DEG,
    LAMP,
    LEAVES,
    LIGHT_RES,
    PERSON,
    PPM,
    Mover,
    parse_conditions,
)


class WorldGeometry(Protocol):
    """What the renderer reads of a world (`world.SyntheticWorld` builds it): the renderer depends on this,
    not on the world module, so the world can own its renderer without an import cycle."""
    seed: int
    sun: np.ndarray                      # (2,) sun direction in the ground plane
    origin: np.ndarray                   # (2,) world x, y of the ground texture's pixel (0, 0)
    atlas: np.ndarray                    # facade texture atlas and its mip offsets/scales
    atlas_mip: np.ndarray
    ground: np.ndarray                   # ground texture (RGB + coverage) and its mips
    ground_mip: np.ndarray
    light: np.ndarray                    # street-light map
    sky: np.ndarray                      # sky panorama (wrapped by one column)
    wall_a: np.ndarray                   # (W, 2) wall end points, normals, heights, lengths
    wall_b: np.ndarray
    wall_normal: np.ndarray
    wall_height: np.ndarray
    wall_length: np.ndarray
    wall_tex: np.ndarray                 # (W, 2) atlas position of each wall's texture
    wall_shade: np.ndarray
    props: np.ndarray                    # (P, k) poles, trees and vehicles

LAYERS = 3                                # wall hits kept per column
FAR = 160.0                               # walls beyond this are not drawn
PROP_RANGE = 60.0                         # nor props and vehicles beyond this (they would be a pixel or two)

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



@dataclass
class Camera:
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



class Renderer:
    """Renders views of one world; keeps the sky colours of each palette once computed."""

    def __init__(self, world: WorldGeometry) -> None:
        self.world = world
        self._sky_rgb: dict[tuple, np.ndarray] = {}

    def render(self, x: float, y: float, yaw: float, conditions: str | Sequence[str] = ("day",),
               size: tuple[int, int] = (480, 640), rng: np.random.Generator | None = None,
               movers: Sequence[Mover] | None = None) -> np.ndarray:
        """RGB uint8 image (size = (height, width)) seen from (x, y) at camera height looking along yaw.

        `rng` drives the per-image randomness (rain streaks, sensor noise); without it the image is a pure
        function of the arguments. `movers` are drawn as extra occluders (see `traffic`).
        """
        cond = set(parse_conditions(conditions))
        if rng is None:
            code = zlib.crc32(f"{x:.4f} {y:.4f} {yaw:.5f} {size}".encode())
            rng = np.random.default_rng([self.world.seed, code])
        cam = Camera(float(x), float(y), float(yaw), int(size[0]), int(size[1]))
        H, W, f, cy = cam.h, cam.w, cam.f, cam.cy
        night, dusk = "night" in cond, "dusk" in cond and "night" not in cond
        overcast = bool(cond & {"winter", "fog", "rain"})
        season = "winter" if "winter" in cond else "autumn" if "autumn" in cond else "summer"

        # walls: per column the LAYERS nearest front-facing hits, painted far to near
        t, wid, u = self.cast(cam)
        valid = wid >= 0
        w_ = np.where(valid, wid, 0)
        depth = np.where(valid, t, 1e9)
        height = np.where(valid, self.world.wall_height[w_], 0.0)
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
        cos_inc = np.abs((cam.dirs[None] * self.world.wall_normal[w_]).sum(-1)) / np.linalg.norm(cam.dirs, axis=1)
        foot = depth / f * PPM / np.sqrt(np.maximum(cos_inc, 0.15))
        lvl = np.clip(np.floor(np.log2(np.maximum(foot, 1e-6)) + 0.5), 0, 2).astype(int)
        ox, oy, sc = self.world.atlas_mip[lvl].transpose(2, 0, 1)
        shade = self.world.wall_shade[w_] if not overcast else 0.85 + 0.15 * self.world.wall_shade[w_]

        def per_pixel(a: np.ndarray, fill: float = 0.0) -> np.ndarray:
            return np.take(np.vstack([a, np.full((1, W), fill)]).astype(np.float32).ravel(), flat)

        ax = per_pixel((self.world.wall_tex[w_, 0] + u * PPM) * sc + ox)
        ay = per_pixel((self.world.wall_tex[w_, 1] + (height - CAMERA_HEIGHT - cy * depth / f) * PPM) * sc + oy) + \
            cam.rc[:, None] * per_pixel(depth * PPM / f * sc)
        tex = cv2.remap(self.world.atlas, ax, ay, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
        zbuf = per_pixel(depth, np.inf)

        # ground below the horizon, by inverse perspective
        h2 = int(math.floor(cy - 0.5)) + 1
        tg = f * CAMERA_HEIGHT / (cam.rc[h2:].astype(np.float64) - cy)
        gl = np.clip(np.floor(np.log2(np.sqrt(tg ** 3 / (f * f * CAMERA_HEIGHT)) / GROUND_RES) + 0.5), 0, 2)
        gox, goy, gsc = self.world.ground_mip[gl.astype(int)].T
        rel = (np.array([cam.x, cam.y]) - self.world.origin) / GROUND_RES
        gx = (rel[0] * gsc + gox)[:, None] + (tg / GROUND_RES * gsc)[:, None] * cam.dirs[:, 0]
        gy = (rel[1] * gsc + goy)[:, None] + (tg / GROUND_RES * gsc)[:, None] * cam.dirs[:, 1]
        gtex = cv2.remap(self.world.ground, gx.astype(np.float32), gy.astype(np.float32), cv2.INTER_LINEAR,
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

    def cast(self, cam: Camera) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(LAYERS, W) arrays: depth, wall index (-1 = none), u (metres along the wall) of the nearest hits."""
        p = np.array([cam.x, cam.y])
        ap, bp = self.world.wall_a - p, self.world.wall_b - p
        facing = (-ap * self.world.wall_normal).sum(1) > 0        # camera on the outer side: back faces dropped
        ahead = (ap @ cam.fwd > 0.05) | (bp @ cam.fwd > 0.05)
        near = np.minimum(np.hypot(*ap.T), np.hypot(*bp.T)) < FAR + self.world.wall_length
        idx = np.nonzero(facing & ahead & near)[0]
        W = cam.w
        if len(idx) == 0:
            return np.full((LAYERS, W), np.inf), np.full((LAYERS, W), -1), np.zeros((LAYERS, W))
        e = (self.world.wall_b - self.world.wall_a)[idx]
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
        u = np.take_along_axis(s, part, 1) * self.world.wall_length[np.where(hit, wid, 0)]
        return pt.T, wid.T, np.where(hit, u, 0).T

    def _paint_props(self, img: np.ndarray, zbuf: np.ndarray, cam: Camera, season: str,
                     movers: Sequence[Mover], dark: bool) -> list[tuple]:
        """Paint cylinders (trees, poles, people) and boxes (cars) through the depth buffer; returns glows."""
        glows: list[tuple] = []
        P = self.world.props
        rel = P[:, :2] - (cam.x, cam.y)
        zc, xc = rel @ cam.fwd, rel @ cam.right
        keep = (zc > 0.2 - P[:, COL_R]) & (zc < PROP_RANGE + P[:, COL_R]) & \
            (np.abs(xc) < zc * cam.w / (2 * cam.f) + P[:, COL_R] + 1)
        for row, z_, x_ in zip(P[keep], zc[keep], xc[keep]):
            kind = int(row[COL_KIND])
            colour = row[COL_RGB]
            if kind == CROWN:
                pal = LEAVES[season]
                colour = np.array(pal[int(row[COL_VAR] * len(pal))], np.float32)
            self._cylinder(img, zbuf, cam, z_, x_, row[COL_R], row[COL_Z0], row[COL_Z1], kind, colour, row[COL_VAR],
                           season)
            if kind == LAMP and dark:
                glows.append((row[COL_X], row[COL_Y], row[COL_Z0], 0.6, (255, 200, 120)))
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

    def _cylinder(self, img, zbuf, cam: Camera, zc: float, xc: float, r: float, z0: float, z1: float,
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
        shade = 0.6 + 0.4 * np.clip((hx * (self.world.sun @ cam.fwd) + hy * (self.world.sun @ cam.right)) / r, 0, 1)
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

    def _box(self, img, zbuf, cam: Camera, m: Mover) -> None:
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

    def _lamp_light(self, cam: Camera, zbuf: np.ndarray) -> np.ndarray:
        """Street-light intensity per pixel from the light map at the pixel's ground/wall foot point."""
        depth = np.where(np.isfinite(zbuf), zbuf, np.float32(0))     # sky pixels get replaced later anyway
        d = (cam.dirs / LIGHT_RES).astype(np.float32)
        o = (np.array([cam.x, cam.y]) - self.world.origin) / LIGHT_RES
        light = cv2.remap(self.world.light, np.float32(o[0]) + depth * d[:, 0], np.float32(o[1]) + depth * d[:, 1],
                          cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
        v = CAMERA_HEIGHT + (np.float32(cam.cy) - cam.rc[:, None]) * depth * np.float32(1 / cam.f)
        return light * np.clip(np.float32(1.2) - v * np.float32(1 / 8), 0, 1)

    def _sky_image(self, cam: Camera, night: bool, dusk: bool, overcast: bool) -> np.ndarray:
        key = (night, dusk, overcast)
        if key not in self._sky_rgb:                      # colour the panorama once per palette
            zen, hor, cloud, skyline = ((5, 8, 22), (30, 32, 50), (28, 28, 36), (14, 14, 22)) if night else \
                ((45, 55, 115), (250, 150, 90), (230, 140, 120), (70, 55, 75)) if dusk else \
                ((70, 130, 215), (180, 208, 238), (245, 245, 248), (150, 165, 185))
            pal = np.array([zen, hor, cloud, skyline], np.float32)
            if overcast:
                pal = 0.3 * pal + 0.7 * pal.mean(1, keepdims=True) * (1.0 if night else 1.1)
            g = np.linspace(0, 1, self.world.sky.shape[0], dtype=np.float32)[:, None, None] ** 2
            base = pal[0] * (1 - g) + pal[1] * g
            base = base + (pal[2] - base) * (self.world.sky[..., :1] / 255 * (0.6 if overcast else 1.0))
            base = base + (pal[3] - base) * (self.world.sky[..., 1:] / 255)
            self._sky_rgb[key] = np.clip(base, 0, 255).astype(np.float32)
        h2 = int(math.floor(cam.cy - 0.5)) + 1
        sh, sw = self.world.sky.shape[0], self.world.sky.shape[1] - 1
        el = np.arctan((cam.cy - cam.rc[:h2]) / cam.f)
        sx = np.mod((cam.yaw - np.arctan(cam.xr)) / (2 * np.pi) * sw, sw).astype(np.float32)
        sy = np.clip((1 - el / (np.pi / 4)) * (sh - 1), 0, sh - 1).astype(np.float32)
        return cv2.remap(self._sky_rgb[key], np.repeat(sx[None], h2, 0), np.repeat(sy[:, None], cam.w, 1),
                         cv2.INTER_LINEAR)

    @staticmethod
    def _glow(img: np.ndarray, zbuf: np.ndarray, cam: Camera, x: float, y: float, z: float, radius: float,
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
