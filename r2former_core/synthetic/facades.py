"""Facade textures of the synthetic world's buildings: storeys of windows, shop fronts, doors, murals."""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .scene import GLASS, PPM, VIVID, WALL_COLOURS


@dataclass
class Style:
    """How one building (or a terrace of them) looks: colours, storey and window proportions."""
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


def new_style(rng: np.random.Generator) -> Style:
    """A random building style."""
    kind = str(rng.choice(["residential", "residential", "brick", "office", "industrial"]))
    wall = WALL_COLOURS[rng.integers(len(WALL_COLOURS))] * rng.uniform(0.85, 1.1)
    if kind == "brick":
        wall = np.array([rng.uniform(120, 170), rng.uniform(55, 80), rng.uniform(40, 60)], np.float32)
    return Style(kind, wall, WALL_COLOURS[rng.integers(len(WALL_COLOURS))] * rng.uniform(0.6, 1.1),
                 GLASS[rng.integers(len(GLASS))], rng.uniform(2.8, 3.6), rng.uniform(3.6, 4.6),
                 rng.uniform(2.0, 3.6), rng.uniform(0.35, 0.6), rng.uniform(0.4, 0.65), rng.random() < 0.55,
                 rng.random() * 0.6 if kind == "residential" else 0.0, rng.random() < 0.5)


class Canvas:
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


def draw_facade(c: Canvas, rng: np.random.Generator, st: Style, front: bool) -> None:
    """Paint a street front (`front`: ground floor, every window) or a side wall (fewer windows) on `c`."""
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
                    c.rect(um - hw, v1 - (v1 - v0) * 0.4, um + hw, v1, WALL_COLOURS[rng.integers(14)] * 0.9)
                c.rect(um - hw - 0.15, v0 - 0.2, um + hw + 0.15, v0 - 0.08, st.trim * 0.8)
    c.rect(0, h - 0.5, w, h, st.trim * 0.6)                                     # parapet
    if front:
        draw_ground_floor(c, rng, st)
    if rng.random() < (0.1 if front else 0.2):                                  # mural: a rare landmark
        x0, y0 = c.px(rng.uniform(0, w * 0.5), rng.uniform(g + 1, max(g + 1.5, h - 2)))
        for _ in range(int(rng.integers(2, 6))):
            cv2.circle(c.rgb, (x0 + int(rng.integers(-30, 60)), y0 + int(rng.integers(-30, 30))),
                       int(rng.integers(8, 40)), VIVID[rng.integers(len(VIVID))].tolist(), -1)


def draw_ground_floor(c: Canvas, rng: np.random.Generator, st: Style) -> None:
    """Shops with signs and awnings, roller doors (industrial) or doors and posters along the ground floor."""
    g, u = st.ground_h, 0.3
    c.rect(0, g - 0.15, c.w_m, g, st.trim * 0.7)
    while u < c.w_m - 2.5:
        sw = min(rng.uniform(4, 8), c.w_m - 0.3 - u)
        if st.shops:
            c.rect(u + 0.2, 0.5, u + sw - 1.6, g - 1.3, st.glass * rng.uniform(0.6, 1.1), int(rng.integers(120, 256)))
            c.rect(u + sw - 1.4, 0, u + sw - 0.2, 2.3, st.trim * 0.4)                  # door
            sign = VIVID[rng.integers(len(VIVID))]
            c.rect(u + 0.1, g - 1.15, u + sw - 0.1, g - 0.3, sign)
            text = "".join(chr(int(rng.integers(65, 91))) for _ in range(int(rng.integers(3, 7))))
            x0, y0 = c.px(u + 0.4, g - 0.45)
            ink = (255, 255, 255) if sign.mean() < 140 else (20, 20, 20)
            cv2.putText(c.rgb, text, (x0, y0), cv2.FONT_HERSHEY_SIMPLEX, 0.3, ink, 1, cv2.LINE_AA)
            if rng.random() < 0.4:                                                   # striped awning
                a, b = VIVID[rng.integers(len(VIVID))], VIVID[rng.integers(len(VIVID))]
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
                c.rect(u + sw - 1.8, 0.8, u + sw - 0.9, 2.2, VIVID[rng.integers(len(VIVID))])
        u += sw
