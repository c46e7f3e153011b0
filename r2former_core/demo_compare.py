"""`python -m r2former_core.demo_compare`: the demo's single-frame against tracking comparison, offline.

`make demo` plays the query bag to the localize node (tracking on, what a robot gets live) and then runs
this on the same query bag with the node's own parameters (the params file the demo generated): every
`--every`-th frame is localized on its own ("single": `Localizer`, published when accepted) and with the
tracker ("tracking": `Tracker.step`, the code the node runs), both on the same features
(`r2former_core.evaluation.evaluate_sequence`, what `r2former eval --sequence --tracking both` runs).
Writes `--out` (JSON {"single": {...}, "tracking": {...}, "_meta": {...}}: within_5m and
gross_error_rate as fractions of ALL compared frames, reranked_per_frame, ms_per_frame, calibration),
the error over the frames beside it (<stem>.png) and one CSV row per frame and mode (<stem>_frames.csv).

Frames are subsampled because reranking the whole top_k for every frame (the single-frame baseline) is
what makes it slow: every 2nd frame of the 10 Hz demo drive is a 5 Hz camera, about the rate the live
node processes on two CPU cores. Exit status 0, 2 with one line on an expected error.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from .data.sources.base import PosedImage, Source
from .errors import EXPECTED_ERRORS, CliError
from .options import LocalizerConfig, TrackingConfig, config_options

log = logging.getLogger(__name__)
TRACK_PREFIX = "track_"          # the node's parameter track_<name> is TrackingConfig.<name>


class EveryNth:
    """Every n-th record of a source (by position in its names), as a `Source`."""

    def __init__(self, source: Source, n: int) -> None:
        if n < 1:
            raise CliError(f"--every must be >= 1, got {n}")
        self.source, self.n = source, n
        self.frames = source.frames
        self.description = source.description + (f", every {n}th frame" if n > 1 else "")
        self._keep = set(source.names[::n])

    def __len__(self) -> int:
        return len(self._keep)

    @property
    def names(self) -> list[str]:
        return [name for name in self.source.names if name in self._keep]

    def __iter__(self) -> Iterator[PosedImage]:
        return (rec for rec in self.source if rec.name in self._keep)

    def poses(self) -> tuple[np.ndarray, np.ndarray]:
        stamps, poses = self.source.poses()
        keep = np.array([name in self._keep for name in self.source.names], dtype=bool)
        return stamps[keep], poses[keep]


def configs_from_params(values: dict[str, Any], device: str) -> tuple[LocalizerConfig, TrackingConfig]:
    """The localizer's and the tracker's settings from the localize node's parameter values."""
    loc = {name: values[name] for name in config_options(LocalizerConfig) if name in values and name != "device"}
    track = {name: values[TRACK_PREFIX + name] for name in config_options(TrackingConfig)
             if TRACK_PREFIX + name in values}
    return (LocalizerConfig(**loc, device=device).validate(),
            TrackingConfig(**track, enabled=True).validate())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m r2former_core.demo_compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--map", required=True, help="map directory")
    p.add_argument("--bag", required=True, help="query rosbag2")
    p.add_argument("--image-topic", default="/camera/image_raw", help="image topic of --bag")
    p.add_argument("--pose-topic", default="/odom", help="ground-truth pose topic of --bag")
    p.add_argument("--model", required=True, help="model file (the map's)")
    p.add_argument("--device", default="cpu", help="auto, cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--params", required=True, help="the localize node's parameters file (keyed /**)")
    p.add_argument("--every", type=int, default=2, help="compare every n-th query frame (default 2)")
    p.add_argument("--out", required=True, help="JSON output (a plot and a CSV are written beside it)")
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    from .data.sources import open_source
    from .evaluation import evaluate_sequence, format_sequence_table, sequence_frames, write_sequence_report
    from .localizer import Localizer
    from .mapdb import MapDatabase
    from .model import load_model

    doc = yaml.safe_load(Path(args.params).read_text())
    try:
        values = doc["/**"]["ros__parameters"]
    except (TypeError, KeyError):
        raise CliError(f"{args.params}: not a parameters file keyed /** with ros__parameters") from None
    loc_config, track_config = configs_from_params(values, args.device)
    model = load_model(args.model, device=args.device, precision=loc_config.precision)
    mapdb = MapDatabase.load(args.map, expected_fingerprint=model.fingerprint, device=args.device)
    localizer = Localizer(model, mapdb, loc_config)
    source = EveryNth(open_source(bag=args.bag, image_topic=args.image_topic, pose_topic=args.pose_topic,
                                  require_poses=True), args.every)
    results = evaluate_sequence(localizer, sequence_frames(localizer, source),
                                modes=("single", "tracking"), tracking=track_config,
                                total=len(source))
    print(format_sequence_table(results), flush=True)
    meta = {"map": str(mapdb.info.path), "model": model.fingerprint, "queries": source.description,
            "every": args.every, "frames": len(source), "localizer_config": asdict(loc_config),
            "tracking_config": asdict(track_config)}
    json_path, plot = write_sequence_report(results, args.out, meta)
    print(f"wrote {json_path} and {plot}", flush=True)
    return {m: r.summary() for m, r in results.items()}


def main(argv: list[str] | None = None) -> int:
    from .logging_setup import setup_logging
    setup_logging()
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except EXPECTED_ERRORS as exc:
        print(f"demo_compare: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
