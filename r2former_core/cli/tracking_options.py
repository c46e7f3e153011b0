"""Command-line options of the tracker (`--sequence` of `r2former localize` and `r2former eval`), built from
`TrackingConfig` so that the command line, the node's parameters and the defaults cannot drift."""
from __future__ import annotations

import argparse

from ..options import TrackingConfig, add_config_option, config_options


def add_sequence_options(p: argparse.ArgumentParser, tracking_choices: tuple[str, ...], tracking_default: str) -> None:
    g = p.add_argument_group("sequence (--sequence: the queries are one drive, played in the order of their stamps)")
    g.add_argument("--sequence", action="store_true",
                   help="treat the queries as one time-ordered sequence (ordered by their stamps) and localize them "
                        "with the tracker (a Bayes filter over the map: r2former_core.tracking, the code the node "
                        "runs)")
    g.add_argument("--tracking", choices=tracking_choices, default=tracking_default,
                   help=f"with --sequence: on = the tracker, off = every frame on its own"
                        f"{', both = both on the same features' if 'both' in tracking_choices else ''} "
                        f"(default {tracking_default})")
    g.add_argument("--odometry", default=None, metavar="FILE",
                   help="with --sequence: the robot's odometry poses (TUM: timestamp tx ty tz qx qy qz qw, in its "
                        "odom frame, of the body the map poses describe), interpolated at the frame stamps; the "
                        "tracker predicts with the increments between frames (without it: a speed-bounded motion "
                        "whose speed the filter estimates)")
    t = p.add_argument_group("tracking filter (with --sequence; docs/TRACKING.md)")
    for name, (default, _) in config_options(TrackingConfig).items():
        if not isinstance(default, bool):
            add_config_option(t, TrackingConfig, name, flag="--track-" + name.replace("_", "-"))


def tracking_config_from_args(args: argparse.Namespace) -> TrackingConfig:
    values = {name: getattr(args, "track_" + name) for name, (default, _) in config_options(TrackingConfig).items()
              if not isinstance(default, bool)}
    return TrackingConfig(**values).validate()


def read_odometry(path: str | None):
    """(stamps, poses) of a TUM odometry file, or None."""
    if not path:
        return None
    from ..data.poses import read_tum
    return read_tum(path)
