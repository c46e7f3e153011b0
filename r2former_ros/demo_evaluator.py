"""`demo_evaluator`: compare the localizer's `~/pose` with ground truth over live topics.

    demo_evaluator --out demo_out [--image-topic /camera/image_raw] [--odom-topic /odom]
                   [--localizer /r2former_localizer] [--frames-published N] [--max-matches 4]
                   [--idle-timeout 3] [--timeout 600] [--ready-file F] [--qos-reliability best_effort]

Subscribes the camera topic (same QoS as the localizer: it records when each image stamp
arrived), the ground-truth odometry, the localizer's `~/pose`, `~/matches`, `~/map_poses` and
`/diagnostics`. It finishes by itself once images have stopped arriving for `--idle-timeout`
seconds and the localizer's diagnostics say it has nothing left to do (or on Ctrl-C / SIGTERM,
or after `--timeout`), then writes to `--out`:

    summary.json     accuracy (within 5 m and 20 deg, median errors), latency p50/p95, frame counts,
                     the localizer's last diagnostics, one row per pose (see r2former_core/demo_report.py)
    trajectory.png   estimates vs ground truth with x/y covariance ellipses, map poses in grey
    matches_*.png    a few ~/matches images spread over the drive

and prints the table. With `--ready-file`, the file is created once the localizer is up (its
latched `~/state` arrived) and subscribes the camera topic, so a script can start the player then.
Exit status 0 when a summary was written, 1 when no image arrived, 2 on bad options.
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import PoseArray, PoseWithCovarianceStamped
from nav_msgs.msg import Odometry
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.utilities import remove_ros_args
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String

from r2former_core.demo_report import MAX_POSITION_M, MAX_YAW_DEG, PoseRecord, format_table, plot_trajectory, summarize

from .conversions import image_msg_to_rgb, pose_from_msg, stamp_to_ns
from .qos import RELIABILITY_CHOICES, latched_qos, stream_qos

NODE_NAME = "r2former_demo_evaluator"
MAX_KEPT_MATCHES = 400          # ~/matches images held in memory to choose the saved ones from


class DemoEvaluator(Node):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(NODE_NAME)
        self.args = args
        self.lock = threading.Lock()
        self.image_arrivals: dict[int, float] = {}
        self.last_image: float | None = None
        self.odom: dict[int, np.ndarray] = {}
        self.poses: list[PoseRecord] = []
        self.matches: list[tuple[int, Image]] = []
        self.matches_seen = 0
        self.map_poses: np.ndarray | None = None
        self.diagnostics: dict[str, str] = {}
        self.diagnostics_arrival = 0.0
        self.state: str | None = None
        self.states: list[str] = []
        self.started = time.monotonic()
        loc = args.localizer.rstrip("/")
        self.localizer_name = loc.rsplit("/", 1)[-1]
        self.pose_topic = f"{loc}/pose"
        image_qos = stream_qos(args.qos_reliability, args.qos_depth)
        if args.compressed:
            self.image_topic = f"{args.image_topic}/compressed"
            self.create_subscription(CompressedImage, self.image_topic, self._on_image, image_qos)
        else:
            self.image_topic = args.image_topic
            self.create_subscription(Image, self.image_topic, self._on_image, image_qos)
        self.create_subscription(Odometry, args.odom_topic, self._on_odom, stream_qos(args.qos_reliability, 100))
        self.create_subscription(PoseWithCovarianceStamped, self.pose_topic, self._on_pose, 100)
        self.create_subscription(Image, f"{loc}/matches", self._on_matches, stream_qos("reliable", 5))
        self.create_subscription(PoseArray, f"{loc}/map_poses", self._on_map_poses, latched_qos())
        self.create_subscription(String, f"{loc}/state", self._on_state, latched_qos())
        self.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, 10)
        self.get_logger().info(f"evaluating {self.pose_topic} against {args.odom_topic}; images on {self.image_topic} "
                               f"({args.qos_reliability}/{args.qos_depth}); output {args.out}")

    # ------------------------------------------------------------------ callbacks
    def _on_image(self, msg: Image | CompressedImage) -> None:
        now = time.monotonic()
        with self.lock:
            self.image_arrivals.setdefault(stamp_to_ns(msg.header.stamp), now)
            self.last_image = now

    def _on_odom(self, msg: Odometry) -> None:
        with self.lock:
            self.odom[stamp_to_ns(msg.header.stamp)] = pose_from_msg(msg.pose.pose)

    def _on_pose(self, msg: PoseWithCovarianceStamped) -> None:
        now = time.monotonic()
        cov = np.asarray(msg.pose.covariance, dtype=np.float64).reshape(6, 6)
        with self.lock:
            self.poses.append(PoseRecord(stamp_to_ns(msg.header.stamp), pose_from_msg(msg.pose.pose), cov, now))

    def _on_matches(self, msg: Image) -> None:
        with self.lock:
            self.matches_seen += 1
            if len(self.matches) < MAX_KEPT_MATCHES:
                self.matches.append((stamp_to_ns(msg.header.stamp), msg))

    def _on_map_poses(self, msg: PoseArray) -> None:
        poses = np.array([pose_from_msg(p) for p in msg.poses], dtype=np.float64).reshape(-1, 7)
        with self.lock:
            self.map_poses = poses

    def _on_state(self, msg: String) -> None:
        with self.lock:
            self.state = msg.data
            self.states.append(msg.data)

    def _on_diagnostics(self, msg: DiagnosticArray) -> None:
        for status in msg.status:
            if status.name.startswith(f"{self.localizer_name}:"):
                with self.lock:
                    self.diagnostics = {kv.key: kv.value for kv in status.values}
                    self.diagnostics_arrival = time.monotonic()

    # ---------------------------------------------------------------- progress
    def ready(self) -> bool:
        """The localizer is up (latched state arrived) and subscribes the camera topic, as do we."""
        with self.lock:
            have_state = self.state is not None
        return (have_state and self.count_subscribers(self.image_topic) >= 2
                and self.count_publishers(self.pose_topic) > 0)

    def finished(self) -> bool:
        """Images stopped `idle_timeout` s ago and the localizer's later diagnostics show no pending work."""
        now = time.monotonic()
        with self.lock:
            if self.last_image is None:
                return False
            idle = now - self.last_image
            d = dict(self.diagnostics)
            fresh = self.diagnostics_arrival > self.last_image + 0.2
        if idle < self.args.idle_timeout:
            return False
        try:
            done = (int(d["pending"]) == 0 and int(d["accepted"]) + int(d["rejected"]) + int(d["malformed"])
                    + int(d["errors"]) >= int(d["processed"]))
        except (KeyError, ValueError):
            done = False
        return (fresh and done) or idle > 4 * self.args.idle_timeout

    def counts_line(self) -> str:
        with self.lock:
            return (f"images {len(self.image_arrivals)}, poses {len(self.poses)}, odometry {len(self.odom)}, "
                    f"matches {self.matches_seen}, state {self.state}")

    # ------------------------------------------------------------------ output
    def write(self, stopped_by: str = "") -> dict[str, Any] | None:
        out = Path(self.args.out)
        out.mkdir(parents=True, exist_ok=True)
        with self.lock:
            if not self.image_arrivals:
                return None
            poses = sorted(self.poses, key=lambda p: p.stamp_ns)
            image_arrivals = dict(self.image_arrivals)
            gt_stamps = np.array(sorted(self.odom), dtype=np.int64)
            gt_poses = np.array([self.odom[s] for s in gt_stamps]).reshape(-1, 7)
            matches = list(self.matches)
            map_poses = self.map_poses
            diagnostics = dict(self.diagnostics)
            states = list(self.states)
        summary = summarize(poses, image_arrivals, gt_stamps, gt_poses,
                            frames_published=self.args.frames_published, diagnostics=diagnostics,
                            max_position_m=self.args.max_position, max_yaw_deg=self.args.max_yaw)
        summary["ground_truth_samples"] = int(len(gt_stamps))
        summary["states"] = states
        summary["stopped_by"] = stopped_by
        summary["topics"] = {"image": self.image_topic, "pose": self.pose_topic, "odometry": self.args.odom_topic}
        title = (f"{len(image_arrivals)} query frames, {len(poses)} poses published, "
                 f"{summary['accuracy']['within']} within {self.args.max_position:g} m / {self.args.max_yaw:g} deg")
        if self.args.title:
            title = f"{self.args.title}\n{title}"
        files = [plot_trajectory(summary, gt_poses, out / "trajectory.png", map_poses=map_poses, title=title)]
        files += self._write_matches(out, matches)
        summary["files"] = [p.name for p in files]
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    def _write_matches(self, out: Path, matches: list[tuple[int, Image]]) -> list[Path]:
        import cv2
        for old in out.glob("matches_*.png"):
            old.unlink()
        count = min(self.args.max_matches, len(matches))
        if count <= 0:
            return []
        picks = sorted(set(np.linspace(0, len(matches) - 1, count).round().astype(int).tolist()))
        files = []
        for k, i in enumerate(picks):
            stamp, msg = matches[i]
            path = out / f"matches_{k:02d}.png"
            cv2.imwrite(str(path), cv2.cvtColor(image_msg_to_rgb(msg), cv2.COLOR_RGB2BGR))
            files.append(path)
        return files


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="demo_evaluator", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (summary.json, trajectory.png, matches_*.png)")
    p.add_argument("--image-topic", default="/camera/image_raw", help="camera topic the localizer subscribes")
    p.add_argument("--compressed", action="store_true", help="the camera topic is <image-topic>/compressed")
    p.add_argument("--odom-topic", default="/odom", help="ground truth (nav_msgs/Odometry, map frame)")
    p.add_argument("--localizer", default="/r2former_localizer", help="the localize node's full name")
    p.add_argument("--qos-reliability", choices=RELIABILITY_CHOICES, default="best_effort",
                   help="image and odometry subscriptions; use the localizer's (default best_effort)")
    p.add_argument("--qos-depth", type=int, default=5, help="image subscription depth (default 5, the localizer's)")
    p.add_argument("--frames-published", type=int, help="how many images the player sends (for the fractions)")
    p.add_argument("--max-position", type=float, default=MAX_POSITION_M, help="metres (default 5)")
    p.add_argument("--max-yaw", type=float, default=MAX_YAW_DEG, help="degrees (default 20)")
    p.add_argument("--max-matches", type=int, default=4, help="~/matches images to save (default 4)")
    p.add_argument("--idle-timeout", type=float, default=3.0,
                   help="finish this many seconds after the last image, once the localizer is idle (default 3)")
    p.add_argument("--timeout", type=float, default=900.0, help="finish after this many seconds regardless")
    p.add_argument("--ready-file", help="create this file once the localizer is up and subscribed")
    p.add_argument("--title", default="", help="first line of the plot's title")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv if argv is None else argv
    args = build_parser().parse_args(remove_ros_args(argv)[1:])
    if args.idle_timeout <= 0 or args.timeout <= 0 or args.qos_depth < 1 or args.max_matches < 0:
        print("demo_evaluator: error: --idle-timeout, --timeout, --qos-depth must be positive", file=sys.stderr)
        return 2
    rclpy.init(args=argv)       # rclpy's handlers turn SIGINT and SIGTERM into a shutdown: we still write
    node: DemoEvaluator | None = None
    stopped_by = "idle"
    try:
        node = DemoEvaluator(args)
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        ready_written = False
        next_report = time.monotonic() + 5.0
        while rclpy.ok():
            executor.spin_once(timeout_sec=0.1)
            now = time.monotonic()
            if args.ready_file and not ready_written and node.ready():
                Path(args.ready_file).write_text("ready\n")
                ready_written = True
                node.get_logger().info("localizer is up and subscribed")
            if node.finished():
                break
            if now - node.started > args.timeout:
                stopped_by = "timeout"
                node.get_logger().warning(f"--timeout {args.timeout:g} s reached")
                break
            if now >= next_report:
                node.get_logger().info(node.counts_line())
                next_report = now + 5.0
        else:
            stopped_by = "signal"
    except (KeyboardInterrupt, ExternalShutdownException):
        stopped_by = "signal"
    if node is None:
        rclpy.try_shutdown()
        return 1
    try:
        summary = node.write(stopped_by)
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    if summary is None:
        print(f"demo_evaluator: no image arrived on {node.image_topic}; nothing to evaluate", file=sys.stderr)
        return 1
    print(format_table(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
