"""Pictures of localization results, without ROS: the matched-pair image.

Used by the `r2former localize --save-matches` CLI, the demo and the ROS node (`~/matches`).
"""
from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from .results import TokenMatches

BANNER_LINE_HEIGHT = 16


def token_pixels(xy: np.ndarray, model_size: tuple[int, int] | None, shown_size: tuple[int, int]) -> np.ndarray:
    """Normalised token coordinates (pixel / max(H, W) of the model input) -> pixels of the shown image.

    `model_size` and `shown_size` are (H, W). When the model size is unknown the shown image is
    assumed to have the model's aspect ratio (pixel = value * max(H, W) of the shown image).
    """
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    sh, sw = shown_size
    if model_size is None:
        return xy * max(sh, sw)
    mh, mw = model_size
    model_px = xy * max(mh, mw)
    return model_px * np.array([sw / mw, sh / mh])


def score_color(score: float) -> tuple[float, float, float]:
    """[0, 1] -> (r, g, b) in [0, 1], red to green through yellow."""
    s = float(np.clip(score if np.isfinite(score) else 0.0, 0.0, 1.0))
    return (min(1.0, 2.0 * (1.0 - s)), min(1.0, 2.0 * s), 0.0)


def _fit_height(image: np.ndarray, height: int) -> np.ndarray:
    h, w = image.shape[:2]
    if h == height:
        return image
    width = max(1, round(w * height / h))
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if h > height else cv2.INTER_LINEAR)


def _placeholder(height: int, width: int, text: str) -> np.ndarray:
    img = np.full((height, width, 3), 64, np.uint8)
    cv2.putText(img, text, (8, height // 2), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (220, 220, 220), 1, cv2.LINE_AA)
    return img


def draw_matches(query_rgb: np.ndarray, map_rgb: np.ndarray | None, matches: TokenMatches,
                 model_size: tuple[int, int] | None = None, num_lines: int = 30,
                 text: Sequence[str] = ()) -> np.ndarray:
    """Query (left) beside the map image (right), `num_lines` best token pairs joined by lines
    coloured by similarity, and `text` lines in a banner above. Returns HxWx3 uint8 RGB."""
    query = np.ascontiguousarray(query_rgb)
    height = query.shape[0]
    if map_rgb is None:
        right = _placeholder(height, query.shape[1], "no map thumbnail")
    else:
        right = _fit_height(np.ascontiguousarray(map_rgb), height)
    canvas_pair = np.concatenate([query, right], axis=1)
    banner_h = BANNER_LINE_HEIGHT * len(text) + (6 if text else 0)
    canvas = np.zeros((banner_h + height, canvas_pair.shape[1], 3), np.uint8)
    canvas[banner_h:] = canvas_pair

    n = min(int(num_lines), len(matches))
    if n > 0:
        order = np.argsort(-np.asarray(matches.similarity, dtype=np.float64))[:n]
        q_px = token_pixels(np.asarray(matches.query_xy)[order], model_size, query.shape[:2])
        m_px = token_pixels(np.asarray(matches.map_xy)[order], model_size, right.shape[:2])
        sims = np.asarray(matches.similarity, dtype=np.float64)[order]
        lo, hi = float(sims.min()), float(sims.max())
        offset = np.array([query.shape[1], banner_h])
        for qp, mp, s in zip(q_px, m_px, sims):
            rel = (s - lo) / (hi - lo) if hi > lo else 1.0
            color = tuple(int(255 * c) for c in score_color(rel))
            a = (int(round(qp[0])), int(round(qp[1])) + banner_h)
            b = tuple(int(round(v)) for v in mp + offset)
            cv2.line(canvas, a, b, color, 1, cv2.LINE_AA)
            cv2.circle(canvas, a, 2, color, -1, cv2.LINE_AA)
            cv2.circle(canvas, b, 2, color, -1, cv2.LINE_AA)
    for i, line in enumerate(text):
        cv2.putText(canvas, line, (4, BANNER_LINE_HEIGHT * (i + 1)), cv2.FONT_HERSHEY_SIMPLEX, 0.42,
                    (255, 255, 255), 1, cv2.LINE_AA)
    return canvas
