"""`localize`: the R2Former localization node (default name `r2former_localizer`).

Subscribes `image` (sensor_msgs/Image) or `image/compressed` (CompressedImage), localizes the newest
frame against a map in a worker thread and publishes

    ~/pose        geometry_msgs/PoseWithCovarianceStamped  (frame map_frame, stamp = image stamp; accepted only)
    ~/matches     sensor_msgs/Image        query beside the best map image with matched tokens (rate-limited)
    ~/candidates  visualization_msgs/MarkerArray           top candidates coloured by score
    ~/map_poses   geometry_msgs/PoseArray  (transient local)  every map image's pose, at load and reload
    ~/state       std_msgs/String          (transient local)  not_localized | localized | lost
    /diagnostics  diagnostic_msgs/DiagnosticArray          latency per stage, rates, drops, map, device
    /initialpose  PoseWithCovarianceStamped (optional)     once per transition to localized, for AMCL/Nav2

Service `~/reload_map` (std_srvs/Trigger) loads the map at the current `map_path` parameter (and
applies the current top_k, rerank, localized_after, lost_after) and swaps it in atomically; a failed
load keeps the old map and the node keeps serving.

The subscription callback only stores the newest message in a one-slot buffer; frames that are
overwritten before the worker takes them are counted as dropped. Nothing queues.
"""
from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import PoseArray, PoseWithCovarianceStamped
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.node import Node
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header, String
from std_srvs.srv import Trigger
from visualization_msgs.msg import MarkerArray

from r2former_core.errors import EXPECTED_ERRORS, ImageDecodeError, R2FormerError
from r2former_core.localizer import Localizer
from r2former_core.mapdb import MapDatabase
from r2former_core.model import load_model
from r2former_core.options import TIMING_STAGES, LocalizerConfig
from r2former_core.results import LocalizationResult

from .conversions import msg_to_rgb, pose_array_msg, pose_with_covariance_msg, rgb_to_image_msg, stamp_to_ns
from .latest_frame import LatestFrameSlot
from .localization_state import LOCALIZED, LocalizationStateMachine, Transition
from .parameters import ParamSpec, ParameterError, declare_parameters
from .paths import resolve_model_path
from .qos import RELIABILITY_CHOICES, latched_qos, stream_qos
from .visualization import candidate_markers, draw_matches

NODE_NAME = "r2former_localizer"
TRANSPORT_CHOICES = ("raw", "compressed")
MAX_MATCH_LINES = 500
WARN_THROTTLE_SEC = 5.0

PARAMETERS: tuple[ParamSpec, ...] = (
    ParamSpec("map_path", "", "map directory built with `r2former build-map` or `build_map` (required); "
              "applied at start-up and by ~/reload_map"),
    ParamSpec("model_path", "", "model file (.safetensors or official .pth); empty = the packaged demo model "
              "models/r2former_tiny_demo.safetensors", read_only=True),
    ParamSpec.from_config(LocalizerConfig, "device", read_only=True),
    ParamSpec.from_config(LocalizerConfig, "precision", read_only=True),
    ParamSpec.from_config(LocalizerConfig, "top_k", note="applied at start-up and by ~/reload_map"),
    ParamSpec.from_config(LocalizerConfig, "rerank", note="applied at start-up and by ~/reload_map"),
    ParamSpec.from_config(LocalizerConfig, "min_confidence", note="rejected results are not published on ~/pose "
                          "and count towards `lost`"),
    ParamSpec("image_transport", "raw", "raw: subscribe `image` (sensor_msgs/Image); compressed: subscribe "
              "`image/compressed` (sensor_msgs/CompressedImage, jpeg or png)", choices=TRANSPORT_CHOICES,
              read_only=True),
    ParamSpec("qos_reliability", "best_effort", "reliability of the image subscription: best_effort (sensor "
              "data, accepts every publisher) or reliable", choices=RELIABILITY_CHOICES, read_only=True),
    ParamSpec("qos_depth", 5, "history depth of the image subscription (the node itself keeps only the newest "
              "frame)", min=1, max=100, read_only=True),
    ParamSpec("map_frame", "map", "frame_id of published poses, candidates and map poses", read_only=True),
    ParamSpec("matches_rate", 2.0, "maximum publish rate of ~/matches in Hz (0 = never); drawn only while "
              "someone subscribes", min=0.0, max=100.0),
    ParamSpec("num_match_lines", 30, "matched token pairs drawn on ~/matches (best first)", min=0,
              max=MAX_MATCH_LINES),
    ParamSpec("num_candidate_markers", 10, "candidates shown on ~/candidates", min=0, max=1000),
    ParamSpec("diagnostics_rate", 1.0, "publish rate of /diagnostics in Hz (0 = never)", min=0.0, max=100.0,
              read_only=True),
    ParamSpec("publish_initialpose", False, "publish /initialpose once each time the state becomes localized "
              "(relocalizes AMCL / Nav2)"),
    ParamSpec("initialpose_min_confidence", 0.7, "minimum confidence of a result published on /initialpose",
              min=0.0, max=1.0),
    ParamSpec("localized_after", 2, "consecutive accepted results to become localized (from not_localized "
              "or lost); applied at start-up and by ~/reload_map", min=1, max=1000),
    ParamSpec("lost_after", 5, "consecutive rejected results to become lost (from localized); applied at "
              "start-up and by ~/reload_map", min=1, max=1000),
)

class StartupError(R2FormerError):
    """The node cannot start (missing map or model, bad parameter); the message says what to do."""


# ------------------------------------------------------------------------ core adapter

def localizer_config(values: dict[str, Any]) -> LocalizerConfig:
    return LocalizerConfig(top_k=int(values["top_k"]), rerank=str(values["rerank"]),
                           min_confidence=float(values["min_confidence"]), device=str(values["device"]),
                           num_matches=MAX_MATCH_LINES)


def load_localizer(model, map_path: str, values: dict[str, Any]):
    """A `Localizer` of `model` on the map at `map_path` with the node's top_k, rerank, min_confidence."""
    if not map_path:
        raise StartupError("parameter map_path is empty; set it to a map directory built with "
                           "`r2former build-map` or `build_map` (e.g. -p map_path:=maps/demo)")
    path = Path(map_path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"map {map_path!r} (parameter map_path) does not exist")
    mapdb = MapDatabase.load(path, expected_fingerprint=model.fingerprint)
    return Localizer(model, mapdb, localizer_config(values))


# ------------------------------------------------------------------------------ stats

@dataclass
class Stats:
    """Counters and smoothed latencies, shared by the worker and the diagnostics timer (under `lock`)."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    malformed: int = 0
    errors: int = 0
    localized_results: int = 0
    accepted: int = 0
    rejected: int = 0
    last_confidence: float = float("nan")
    last_reason: str = ""
    last_error: str = ""
    latency_ms: dict[str, float] = field(default_factory=dict)  # exponential moving averages
    end_to_end_ms: float = float("nan")                         # receipt -> published, last frame

    def smooth(self, name: str, value_ms: float, alpha: float = 0.2) -> None:
        old = self.latency_ms.get(name)
        self.latency_ms[name] = value_ms if old is None else (1 - alpha) * old + alpha * value_ms


# ------------------------------------------------------------------------------- node

class LocalizeNode(Node):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(NODE_NAME, **kwargs)
        self._values = declare_parameters(self, PARAMETERS)
        self._model_path = resolve_model_path(self._values["model_path"])
        self._map_frame = self._values["map_frame"]
        self._model = load_model(self._model_path, device=self._values["device"])
        self._localizer = load_localizer(self._model, self._values["map_path"], self._values)
        self._localizer_lock = threading.Lock()   # guards swapping `_localizer` and the state machine
        self._reload_lock = threading.Lock()      # one reload at a time
        self._state = LocalizationStateMachine(self._values["localized_after"], self._values["lost_after"])
        self._initialpose_pending = False
        self._stats = Stats()
        self._slot: LatestFrameSlot[Image | CompressedImage] = LatestFrameSlot()
        self._last_matches_time = 0.0
        self._window = (time.monotonic(), 0, 0)   # (time, received, taken) at the last diagnostics

        self._pose_pub = self.create_publisher(PoseWithCovarianceStamped, "~/pose", 10)
        self._matches_pub = self.create_publisher(Image, "~/matches", stream_qos("reliable", 1))
        self._candidates_pub = self.create_publisher(MarkerArray, "~/candidates", 10)
        self._map_poses_pub = self.create_publisher(PoseArray, "~/map_poses", latched_qos())
        self._state_pub = self.create_publisher(String, "~/state", latched_qos())
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._initialpose_pub = self.create_publisher(PoseWithCovarianceStamped, "/initialpose", 1)

        qos = stream_qos(self._values["qos_reliability"], self._values["qos_depth"])
        if self._values["image_transport"] == "compressed":
            self._image_sub = self.create_subscription(CompressedImage, "image/compressed", self._on_image, qos)
        else:
            self._image_sub = self.create_subscription(Image, "image", self._on_image, qos)
        self._reload_srv = self.create_service(Trigger, "~/reload_map", self._on_reload,
                                               callback_group=MutuallyExclusiveCallbackGroup())
        rate = float(self._values["diagnostics_rate"])
        self._diag_timer = self.create_timer(1.0 / rate, self._publish_diagnostics) if rate > 0 else None

        self._check_frame(self._localizer)
        self._publish_map_poses()
        self._publish_state()
        self._worker = threading.Thread(target=self._work, name="r2former-localize", daemon=True)
        self._worker.start()
        m = self._localizer.map
        self.get_logger().info(
            f"ready: map={self._values['map_path']} images={len(m)} model={self._model_path} "
            f"fingerprint={self._localizer.model.fingerprint} device={self._localizer.device} "
            f"topic={self._image_sub.topic_name} qos={self._values['qos_reliability']}/{self._values['qos_depth']}")

    # ------------------------------------------------------------------ input
    def _on_image(self, msg: Image | CompressedImage) -> None:
        self._slot.put(msg)

    # ----------------------------------------------------------------- worker
    def _work(self) -> None:
        while not self._slot.closed:
            frame = self._slot.take(timeout=0.5)
            if frame is None:
                continue
            try:
                self._process(frame.item, frame.received_at)
            except Exception as exc:  # noqa: BLE001 - the worker must survive anything one frame does
                if self._slot.closed or not rclpy.ok(context=self.context):
                    return
                with self._stats.lock:
                    self._stats.errors += 1
                    self._stats.last_error = f"{type(exc).__name__}: {exc}"
                self.get_logger().error(f"localization failed: {type(exc).__name__}: {exc}",
                                        throttle_duration_sec=WARN_THROTTLE_SEC)

    def _process(self, msg: Image | CompressedImage, received_at: float) -> None:
        t0 = time.perf_counter()
        try:
            rgb = msg_to_rgb(msg)
        except ImageDecodeError as exc:
            with self._stats.lock:
                self._stats.malformed += 1
            self.get_logger().warning(f"skipping image: {exc}", throttle_duration_sec=WARN_THROTTLE_SEC)
            return
        decode_ms = (time.perf_counter() - t0) * 1e3
        with self._localizer_lock:
            localizer = self._localizer
        result: LocalizationResult = localizer.localize(rgb, decode_ms=decode_ms)
        result.judge(float(self.get_parameter("min_confidence").value))   # it can change at run time
        timings = dict(result.timings_ms)

        stamp = msg.header.stamp
        if stamp_to_ns(stamp) == 0:
            stamp = self.get_clock().now().to_msg()
        with self._localizer_lock:
            if localizer is not self._localizer:   # the map changed while we worked: stale result
                return
            transition = self._state.update(result.accepted)
            if transition is not None and transition.current == LOCALIZED:
                self._initialpose_pending = True
            elif transition is not None:
                self._initialpose_pending = False
            send_initialpose = (self._initialpose_pending and self._state.state == LOCALIZED
                                and result.accepted and bool(self.get_parameter("publish_initialpose").value)
                                and result.confidence >= self.get_parameter("initialpose_min_confidence").value)
            if send_initialpose:
                self._initialpose_pending = False

        if result.accepted:
            pose = pose_with_covariance_msg(result.pose, result.covariance, self._map_frame, stamp)
            self._pose_pub.publish(pose)
            if send_initialpose:
                self._initialpose_pub.publish(pose)
                self.get_logger().info(f"published /initialpose (confidence {result.confidence:.2f})")
        if transition is not None:
            self._on_transition(transition, result)
        if self._candidates_pub.get_subscription_count() > 0:
            self._candidates_pub.publish(candidate_markers(
                result.candidates, self._map_frame, stamp,
                max_markers=int(self.get_parameter("num_candidate_markers").value)))
        self._maybe_publish_matches(rgb, result, localizer, msg.header, stamp)

        with self._stats.lock:
            s = self._stats
            s.localized_results += 1
            s.accepted += int(result.accepted)
            s.rejected += int(not result.accepted)
            s.last_confidence = float(result.confidence)
            s.last_reason = result.reason
            for name in TIMING_STAGES:
                if name in timings:
                    s.smooth(name, float(timings[name]))
            s.end_to_end_ms = (time.monotonic() - received_at) * 1e3

    def _on_transition(self, transition: Transition, result: LocalizationResult) -> None:
        self.get_logger().info(f"state {transition.previous} -> {transition.current} "
                               f"(confidence {result.confidence:.2f}{', ' + result.reason if result.reason else ''})")
        self._publish_state()

    def _maybe_publish_matches(self, rgb, result: LocalizationResult, localizer, header: Header, stamp) -> None:
        rate = float(self.get_parameter("matches_rate").value)
        now = time.monotonic()
        if rate <= 0 or now - self._last_matches_time < 1.0 / rate:
            return
        if self._matches_pub.get_subscription_count() == 0:
            return
        self._last_matches_time = now
        best = result.best
        thumb = localizer.map.thumbnail(best.index) if best is not None else None
        lines = [f"{self._state.state}  confidence {result.confidence:.2f}"
                 f"{'' if result.accepted else '  rejected: ' + result.reason}"]
        if best is not None:
            lines.append(f"best #{best.index} {best.name}  score {best.score:.3f}  global {best.global_score:.3f}"
                         f"  rerank {best.rerank_score:.3f}")
        image = draw_matches(rgb, thumb, result.matches, model_size=tuple(localizer.model.cfg.image_size),
                             num_lines=int(self.get_parameter("num_match_lines").value), text=lines)
        out = rgb_to_image_msg(image, encoding="rgb8")
        out.header.stamp = stamp
        out.header.frame_id = header.frame_id
        self._matches_pub.publish(out)

    def _check_frame(self, localizer) -> None:
        frame = localizer.map.info.frame_id
        if frame != self._map_frame:
            self.get_logger().warning(f"map {localizer.map.info.path} was built in frame {frame!r}, poses are "
                                      f"published in map_frame {self._map_frame!r}")

    # ------------------------------------------------------------ publishing
    def _publish_state(self) -> None:
        self._state_pub.publish(String(data=self._state.state))

    def _publish_map_poses(self) -> None:
        poses = self._localizer.map.poses
        self._map_poses_pub.publish(pose_array_msg(poses, self._map_frame, self.get_clock().now().to_msg()))

    def _publish_diagnostics(self) -> None:
        counts = self._slot.counts()
        now = time.monotonic()
        t_prev, rec_prev, taken_prev = self._window
        dt = max(now - t_prev, 1e-6)
        self._window = (now, counts.received, counts.taken)
        with self._stats.lock:
            s = self._stats
            latency = dict(s.latency_ms)
            snapshot = dict(malformed=s.malformed, errors=s.errors, accepted=s.accepted, rejected=s.rejected,
                            confidence=s.last_confidence, reason=s.last_reason, last_error=s.last_error,
                            end_to_end=s.end_to_end_ms)
        with self._localizer_lock:
            localizer = self._localizer
            state = self._state.state
        status = DiagnosticStatus(name=f"{self.get_name()}: localization", hardware_id=str(localizer.device))
        if snapshot["errors"] and snapshot["last_error"]:
            status.level, status.message = DiagnosticStatus.WARN, f"{state}; last error: {snapshot['last_error']}"
        elif state == LOCALIZED:
            status.level, status.message = DiagnosticStatus.OK, state
        else:
            status.level = DiagnosticStatus.WARN
            status.message = f"{state}{'; ' + snapshot['reason'] if snapshot['reason'] else ''}"
        values: list[tuple[str, Any]] = [
            ("state", state),
            ("confidence", f"{snapshot['confidence']:.3f}"),
            ("input_rate_hz", f"{(counts.received - rec_prev) / dt:.2f}"),
            ("processed_rate_hz", f"{(counts.taken - taken_prev) / dt:.2f}"),
            ("received", counts.received),
            ("processed", counts.taken),
            ("dropped", counts.dropped),
            ("pending", counts.pending),
            ("malformed", snapshot["malformed"]),
            ("errors", snapshot["errors"]),
            ("accepted", snapshot["accepted"]),
            ("rejected", snapshot["rejected"]),
            *((f"latency_{name}_ms", f"{latency[name]:.2f}") for name in TIMING_STAGES if name in latency),
            ("latency_end_to_end_ms", f"{snapshot['end_to_end']:.2f}"),
            ("device", str(localizer.device)),
            ("map_size", len(localizer.map)),
            ("map_path", self._values["map_path"]),
            ("model_path", str(self._model_path)),
            ("model_fingerprint", localizer.model.fingerprint),
        ]
        status.values = [KeyValue(key=k, value=str(v)) for k, v in values]
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.get_clock().now().to_msg()
        self._diag_pub.publish(array)

    # --------------------------------------------------------------- reload
    def _on_reload(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        if not self._reload_lock.acquire(blocking=False):
            response.success, response.message = False, "a reload is already running"
            return response
        try:
            values = {spec.name: self.get_parameter(spec.name).value for spec in PARAMETERS}
            t0 = time.perf_counter()
            try:
                localizer = load_localizer(self._model, values["map_path"], values)
            except Exception as exc:  # noqa: BLE001 - any failure keeps the old map
                response.success = False
                response.message = f"map not reloaded, keeping {self._values['map_path']}: {exc}"
                self.get_logger().error(response.message)
                return response
            self._check_frame(localizer)
            with self._localizer_lock:
                self._localizer = localizer
                self._values = values
                self._state = LocalizationStateMachine(values["localized_after"], values["lost_after"])
                self._initialpose_pending = False
            self._publish_map_poses()
            self._publish_state()
            response.success = True
            response.message = (f"loaded {values['map_path']} ({len(localizer.map)} images) in "
                                f"{time.perf_counter() - t0:.2f} s")
            self.get_logger().info(response.message)
            return response
        finally:
            self._reload_lock.release()

    # ------------------------------------------------------------- shutdown
    def stop(self, timeout: float = 3.0) -> None:
        """Stop the worker thread (it finishes the frame it is on)."""
        self._slot.close()
        if self._worker.is_alive() and self._worker is not threading.current_thread():
            self._worker.join(timeout)


def main(args: list[str] | None = None) -> int:
    rclpy.init(args=args)
    node: LocalizeNode | None = None
    try:
        node = LocalizeNode()
        executor = MultiThreadedExecutor(num_threads=2)
        executor.add_node(node)
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except EXPECTED_ERRORS as exc:
        rclpy.logging.get_logger(NODE_NAME).fatal(f"cannot start: {exc}")
        return 1
    except Exception:
        if not rclpy.ok():     # Ctrl-C while starting (e.g. loading the model): not an error
            return 0
        raise
    finally:
        if node is not None:
            node.stop()
            node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
