"""RViz pictures of a localization result.

* `draw_matches` (from `r2former_core.visualization`, shared with the CLI): the query beside the
  best map image, lines between the best matched token pairs, a text banner with scores and state
  (an RGB array; publish it with `rgb_to_image_msg`).
* `candidate_markers`: the top candidates as arrows coloured by score (red = low, green = high),
  the best one with a sphere, each with its rank and score.
"""
from __future__ import annotations

from collections.abc import Sequence

from builtin_interfaces.msg import Time
from visualization_msgs.msg import Marker, MarkerArray

from r2former_core.results import Candidate
from r2former_core.visualization import draw_matches, score_color, token_pixels

from .conversions import pose_msg

__all__ = ["candidate_markers", "draw_matches", "score_color", "token_pixels"]


def candidate_markers(candidates: Sequence[Candidate], frame_id: str, stamp: Time, max_markers: int = 10,
                      namespace: str = "candidates", arrow_length: float = 1.0) -> MarkerArray:
    """Top candidates as arrows coloured by score (previous markers are deleted first)."""
    out = MarkerArray()
    clear = Marker(action=Marker.DELETEALL)
    clear.header.frame_id = frame_id
    clear.header.stamp = stamp
    clear.ns = namespace
    out.markers.append(clear)
    top = list(candidates)[:max(0, int(max_markers))]
    for rank, cand in enumerate(top):
        r, g, b = score_color(cand.score)
        pose = pose_msg(cand.pose)
        arrow = Marker(type=Marker.ARROW, action=Marker.ADD, id=3 * rank, ns=namespace, pose=pose)
        arrow.header.frame_id = frame_id
        arrow.header.stamp = stamp
        arrow.scale.x, arrow.scale.y, arrow.scale.z = arrow_length, 0.1 * arrow_length, 0.1 * arrow_length
        arrow.color.r, arrow.color.g, arrow.color.b, arrow.color.a = r, g, b, 1.0 if rank == 0 else 0.7
        out.markers.append(arrow)
        label = Marker(type=Marker.TEXT_VIEW_FACING, action=Marker.ADD, id=3 * rank + 1, ns=namespace)
        label.header = arrow.header
        label.pose.position.x = pose.position.x
        label.pose.position.y = pose.position.y
        label.pose.position.z = pose.position.z + 0.3 * arrow_length
        label.pose.orientation.w = 1.0
        label.scale.z = 0.25 * arrow_length
        label.color.r = label.color.g = label.color.b = label.color.a = 1.0
        label.text = f"#{rank + 1} {cand.score:.2f}"
        out.markers.append(label)
        if rank == 0:
            sphere = Marker(type=Marker.SPHERE, action=Marker.ADD, id=3 * rank + 2, ns=namespace, pose=pose)
            sphere.header = arrow.header
            sphere.scale.x = sphere.scale.y = sphere.scale.z = 0.3 * arrow_length
            sphere.color.r, sphere.color.g, sphere.color.b, sphere.color.a = r, g, b, 0.9
            out.markers.append(sphere)
    return out
