"""`localize`: the R2Former localization node (managed lifecycle node, default name `r2former_localizer`).

Subscribes `image` (sensor_msgs/Image) or `image/compressed` (CompressedImage), localizes the newest
frame against a map in a worker thread and publishes the pose of `base_frame` in `map_frame`:

    ~/pose        geometry_msgs/PoseWithCovarianceStamped  (frame map_frame, stamp = image stamp; accepted only)
    ~/matches     sensor_msgs/Image        query beside the best map image with matched tokens (rate-limited)
    ~/candidates  visualization_msgs/MarkerArray           top candidates (map poses) coloured by score
    ~/map_poses   geometry_msgs/PoseArray  (transient local)  every map image's pose, at activation and reload
    ~/state       std_msgs/String          (transient local)  not_localized | localized | lost
    /diagnostics  diagnostic_msgs/DiagnosticArray          input and pose rates, input timeout, localization
    initialpose   PoseWithCovarianceStamped (optional, relative: /<ns>/initialpose) on each transition to localized
    /tf           map_frame -> odom_frame (optional, publish_tf), the way AMCL sends it

Tracking (parameter `tracking`, default on; docs/TRACKING.md): every frame goes through the tracker
(`r2former_core.tracking.Tracker`, a Bayes filter over the map on the same Localizer, the code
`r2former localize --sequence` runs), which reranks only the candidates where the robot can be and
publishes only when one place holds `track_min_mass` of the belief; the published covariance is the
filter's and ~/state follows the filter (global / tracking / lost). Its parameters are `track_<field>`
of `TrackingConfig`; setting any of them (or `tracking`) restarts the filter (global search). Inputs:

    odom_topic    nav_msgs/Odometry (optional): the odometry pose at each image stamp (interpolated from a
                  bounded buffer) drives the prediction; a frame without one is predicted without odometry
                  (diagnostics say why)
    initialpose   PoseWithCovarianceStamped (relative, as AMCL's): seeds the filter at that pose (the map
                  entries near it); when the pose cannot be used (camera map without a known mounting, no map
                  entry near it) the filter restarts global search. The node's own initialpose is ignored.

The filter restarts on deactivate, cleanup, a map change and when the image stamps jump back (a looped
bag or a sim-time reset: the tracker compares each image's header stamp with the last).

Frames (REP-105): a map of base poses (its child_frame is base_frame) is published as it is; a map
of camera poses is composed with the camera's mounting, `camera_pose_in_base` when set, else TF
(base_frame -> the image's frame_id at the image stamp). Maps that do not record their child frame
are published as they are, with a warning (r2former_core.frames).

Lifecycle (rclpy.lifecycle; Nav2's lifecycle_manager can drive it): configure loads model and map
(a failure is logged and returns FAILURE; the process stays up), activate subscribes the camera and
starts the worker, deactivate stops both, cleanup frees model and map. With `autostart` (default)
the node configures and activates itself.

Service `~/reload_map` (std_srvs/Trigger) reloads the map at `map_path` from disk (e.g. after a
rebuild); setting `map_path` loads that map (the change is refused when it cannot be loaded). A
failed load keeps the old map and the node keeps serving.

Frame processing is one method per step (`_decode`, `_localize`, `_base_estimate`,
`_advance_state`, `_publish_result`, `_record`), each small and replaceable; the subscription
callback only stores the newest message in a one-slot buffer; frames overwritten before the
worker takes them are counted as dropped. Nothing queues.

Reliability (docs/RELIABILITY.md): an image above `max_image_pixels` (read from the message or the
PNG/JPEG header before anything is decoded) or a malformed one is skipped, counted in diagnostics
(`malformed`, `too_large`, `last_malformed`) and logged (throttled); an exception in one frame is
counted (`errors`) and the worker goes on with the next; the image subscription's QoS events
(matched, incompatible QoS, lost messages) say in diagnostics why no image arrives; a map directory
deleted or replaced under the running node is reported (the loaded map keeps serving).

Fault injection, for tests only: with the environment variable `R2FORMER_INJECT_FAULT_FRAME_ID` set
to a frame id, every image whose `header.frame_id` equals it raises `InjectedFault` in the pose step
of the worker (after localization, before the pose is published), as a bug in that step would.
"""
from __future__ import annotations

import dataclasses
import gc
import os
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import PoseArray, PoseWithCovarianceStamped
from nav_msgs.msg import Odometry
from rcl_interfaces.msg import SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.event_handler import (
    QoSMessageLostInfo,
    QoSRequestedIncompatibleQoSInfo,
    QoSSubscriptionMatchedInfo,
    SubscriptionEventCallbacks,
)
from rclpy.exceptions import ParameterUninitializedException
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.qos import qos_policy_name_from_kind
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header, String
from std_srvs.srv import Trigger
from visualization_msgs.msg import MarkerArray

from r2former_core.data.image_limits import ImageTooLargeError
from r2former_core.data.poses import compose_poses
from r2former_core.errors import EXPECTED_ERRORS, ImageDecodeError, MapError, R2FormerError
from r2former_core.frames import (
    FrameError,
    camera_to_base,
    is_optical_frame,
    map_pose_warning,
    odom_in_map,
    optical_to_body,
    pose_from_xyzrpy,
    poses_are_base,
)
from r2former_core.localizer import Localizer
from r2former_core.mapdb import MapDatabase
from r2former_core.model import load_model
from r2former_core.options import TIMING_STAGES, LocalizerConfig, TrackingConfig, config_options
from r2former_core.resources import resolve_model_path
from r2former_core.results import LocalizationResult
from r2former_core.tracking import TrackedResult, Tracker

from . import health
from .conversions import (
    msg_to_rgb,
    ns_to_stamp,
    pose_array_msg,
    pose_from_msg,
    pose_with_covariance_msg,
    rgb_to_image_msg,
    stamp_to_ns,
)
from .latest_frame import LatestFrameSlot
from .localization_state import LOCALIZED, LocalizationStateMachine, Transition
from .parameters import ParamSpec, declare_parameters
from .pose_buffer import PoseBuffer, PoseLookup
from .qos import RELIABILITY_CHOICES, latched_qos, stream_qos
from .tf_io import TfClient, TransformUnavailable, make_tf_client
from .visualization import candidate_markers, draw_matches

NODE_NAME = "r2former_localizer"
TRANSPORT_CHOICES = ("raw", "compressed")
MAX_MATCH_LINES = 500
WARN_THROTTLE_SEC = 5.0
TF_REPUBLISH_HZ = 10.0
FAULT_INJECTION_ENV = "R2FORMER_INJECT_FAULT_FRAME_ID"
STAGES = (*TIMING_STAGES, "filter")     # latencies in diagnostics (filter: the tracker's prediction and update)
TRACK_PREFIX = "track_"                 # parameter track_<name> = TrackingConfig.<name>
ODOM_BUFFER = 1000                      # odometry samples kept (10 s at 100 Hz)
ODOM_TOLERANCE_S = 0.05                 # an image stamp this close to the newest odometry sample uses it
ODOM_MAX_GAP_S = 0.5                    # odometry samples further apart are not interpolated across
ODOM_RESET_JUMP_S = 1.0                 # odometry stamps jumping back by more (a looped bag) clear the buffer

# Parameters: "fixed" ones are read-only (read at configure); all others are applied live.
PARAMETERS: tuple[ParamSpec, ...] = (
    ParamSpec("map_path", "", "map directory built with `r2former build-map` or `build_map` (required); loaded at "
              "configure; setting it loads that map (refused when it cannot be loaded), ~/reload_map reloads it"),
    ParamSpec("model_path", "", "model file (.safetensors or official .pth); empty = the packaged demo model "
              "models/r2former_tiny_demo.safetensors", read_only=True),
    ParamSpec.from_config(LocalizerConfig, "device", read_only=True),
    ParamSpec.from_config(LocalizerConfig, "precision", read_only=True),
    ParamSpec.from_config(LocalizerConfig, "top_k"),
    ParamSpec.from_config(LocalizerConfig, "rerank"),
    ParamSpec.from_config(LocalizerConfig, "rerank_budget_ms"),
    ParamSpec.from_config(LocalizerConfig, "rerank_margin"),
    ParamSpec.from_config(LocalizerConfig, "rerank_min"),
    ParamSpec.from_config(LocalizerConfig, "min_confidence", note="rejected results are not published on ~/pose "
                          "and count towards `lost`"),
    ParamSpec.from_config(LocalizerConfig, "max_image_pixels", note="an image above it is skipped unread and "
                          "counted in diagnostics (too_large)"),
    ParamSpec("image_transport", "raw", "raw: subscribe `image` (sensor_msgs/Image); compressed: subscribe "
              "`image/compressed` (sensor_msgs/CompressedImage, jpeg or png)", choices=TRANSPORT_CHOICES,
              read_only=True),
    ParamSpec("qos_reliability", "best_effort", "reliability of the image subscription: best_effort (sensor "
              "data, accepts every publisher) or reliable", choices=RELIABILITY_CHOICES, read_only=True),
    ParamSpec("qos_depth", 5, "history depth of the image subscription (the node itself keeps only the newest "
              "frame)", min=1, max=100, read_only=True),
    ParamSpec("map_frame", "map", "frame_id of published poses, candidates and map poses (REP-105 map)",
              read_only=True),
    ParamSpec("base_frame", "base_link", "the robot frame whose pose is published (REP-105 base_link)",
              read_only=True),
    ParamSpec("odom_frame", "odom", "the odometry frame of map_frame -> odom_frame (publish_tf)", read_only=True),
    ParamSpec("camera_pose_in_base", [], "[x, y, z, roll, pitch, yaw] (metres, radians): pose of the camera frame "
              "(body convention: x forward, y left, z up) in base_frame; empty = from TF (base_frame -> the "
              "image's frame_id at the image stamp). Used when the map holds camera poses"),
    ParamSpec("transform_timeout", 0.2, "seconds to wait for a TF lookup (and, with odom_topic, an odometry pose) "
              "at the image stamp", min=0.0, max=10.0),
    ParamSpec("publish_tf", False, "broadcast map_frame -> odom_frame like AMCL (needs odom_frame -> base_frame "
              "in TF at the image stamps)", read_only=True),
    ParamSpec("transform_tolerance", 1.0, "seconds the published map -> odom transform is post-dated (as AMCL's "
              "transform_tolerance)", min=0.0, max=10.0),
    ParamSpec("autostart", True, "configure and activate on start (without a lifecycle manager)", read_only=True),
    ParamSpec("matches_rate", 2.0, "maximum publish rate of ~/matches in Hz (0 = never); drawn only while "
              "someone subscribes", min=0.0, max=100.0),
    ParamSpec("num_match_lines", 30, "matched token pairs drawn on ~/matches (best first)", min=0,
              max=MAX_MATCH_LINES),
    ParamSpec("num_candidate_markers", 10, "candidates shown on ~/candidates", min=0, max=1000),
    ParamSpec("diagnostics_rate", 1.0, "publish rate of /diagnostics in Hz (0 = never)", min=0.0, max=100.0,
              read_only=True),
    ParamSpec("diagnostics_window", 5.0, "seconds over which diagnostic rates and errors are counted (a "
              "transient error clears after it)", min=0.1, max=600.0, read_only=True),
    ParamSpec("input_timeout_s", 3.0, "seconds without an image before diagnostics report ERROR (STALE when no "
              "image ever arrived)", min=0.1, max=5.0, read_only=True),
    ParamSpec("expected_image_rate_min", 1.0, "Hz, diagnostics warn below this input rate", min=0.0, max=1000.0,
              read_only=True),
    ParamSpec("expected_image_rate_max", 100.0, "Hz, diagnostics warn above this input rate", min=0.001,
              max=1000.0, read_only=True),
    ParamSpec("expected_pose_rate_min", 0.0, "Hz, diagnostics warn below this rate of published poses (0 = no "
              "minimum)", min=0.0, max=1000.0, read_only=True),
    ParamSpec("expected_pose_rate_max", 100.0, "Hz, diagnostics warn above this rate of published poses",
              min=0.001, max=1000.0, read_only=True),
    ParamSpec("hardware_id", "", "hardware_id of the diagnostics; empty = the camera's frame_id", read_only=True),
    ParamSpec("publish_initialpose", False, "publish initialpose (relative to the namespace) once each time the "
              "state becomes localized (relocalizes AMCL / Nav2)"),
    ParamSpec("initialpose_min_confidence", 0.7, "minimum confidence of a result published on initialpose",
              min=0.0, max=1.0),
    ParamSpec("localized_after", 2, "consecutive accepted results to become localized (from not_localized "
              "or lost)", min=1, max=1000),
    ParamSpec("lost_after", 5, "consecutive rejected results to become lost (from localized)", min=1, max=1000),
    ParamSpec.from_config(TrackingConfig, "enabled", param="tracking", note="on: the tracker decides what is "
                          "published (track_min_mass) and ~/state follows it; min_confidence, localized_after and "
                          "lost_after apply with tracking off"),
    ParamSpec("odom_topic", "", "nav_msgs/Odometry of base_frame in the odometry frame for the tracker's "
              "prediction, interpolated at each image stamp (e.g. /odom or robot_localization's "
              "/odometry/filtered); empty = no odometry (the filter estimates the speed: fine at vehicle speeds, "
              "too many wrong places for a ground robot, which should give odometry)", read_only=True),
    *(ParamSpec.from_config(TrackingConfig, name, param=TRACK_PREFIX + name)
      for name in config_options(TrackingConfig) if name != "enabled"),
)
# Every description says when the value takes effect.
TRACKING_PARAMETERS = frozenset(spec.name for spec in PARAMETERS
                                if spec.name == "tracking" or spec.name.startswith(TRACK_PREFIX))
PARAMETERS = tuple(dataclasses.replace(spec, description=spec.description + (
    " [fixed: read at configure]" if spec.read_only else " [live: setting it restarts the tracker]"
    if spec.name in TRACKING_PARAMETERS else " [live: applied when set]")) for spec in PARAMETERS)
SPECS = {spec.name: spec for spec in PARAMETERS}


class StartupError(R2FormerError):
    """The node cannot configure (missing map or model, bad parameter); the message says what to do."""


class InjectedFault(RuntimeError):
    """Raised for test images when R2FORMER_INJECT_FAULT_FRAME_ID names their frame id (see the module doc)."""


# ------------------------------------------------------------------------ core adapter

def localizer_config(values: dict[str, Any]) -> LocalizerConfig:
    """The LocalizerConfig of the node's parameters (every parameter named like a config field)."""
    fields = {name: values[name] for name in config_options(LocalizerConfig) if name in values}
    return LocalizerConfig(**fields, num_matches=MAX_MATCH_LINES)


def tracking_config(values: dict[str, Any]) -> TrackingConfig:
    """The TrackingConfig of the node's parameters (`tracking` and every track_<field>)."""
    fields = {name: values[TRACK_PREFIX + name] for name in config_options(TrackingConfig)
              if TRACK_PREFIX + name in values}
    return TrackingConfig(enabled=bool(values.get("tracking", True)), **fields).validate()


def make_tracker(localizer: Localizer, values: dict[str, Any]) -> Tracker | None:
    """The tracker of `localizer` with the node's tracking parameters, or None with tracking off."""
    config = tracking_config(values)
    return Tracker(localizer, config) if config.enabled else None


def load_localizer(model, map_path: str, values: dict[str, Any]) -> Localizer:
    """A `Localizer` of `model` on the map at `map_path` with the node's top_k, rerank, min_confidence."""
    if not map_path:
        raise StartupError("parameter map_path is empty; set it to a map directory built with "
                           "`r2former build-map` or `build_map` (e.g. -p map_path:=maps/demo)")
    path = Path(map_path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"map {map_path!r} (parameter map_path) does not exist")
    config = localizer_config(values)
    mapdb = MapDatabase.load(path, expected_fingerprint=model.fingerprint, device=config.device)
    return Localizer(model, mapdb, config)


def mounting_from_parameter(values: list[float]) -> np.ndarray | None:
    """camera_pose_in_base -> pose (7,), or None when empty (use TF). FrameError otherwise."""
    if not values:
        return None
    try:
        return pose_from_xyzrpy(values)
    except FrameError as exc:
        raise FrameError(f"camera_pose_in_base: {exc}") from None


# ------------------------------------------------------------------------------ stats

@dataclass
class Stats:
    """Counters and smoothed latencies, shared by the worker and the diagnostics timer (under `lock`)."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    malformed: int = 0
    too_large: int = 0         # malformed images refused for their size (max_image_pixels)
    last_malformed: str = ""
    errors: int = 0
    map_errors: int = 0        # errors reading the loaded map's files (changed under the node)
    last_map_error: str = ""
    tf_failures: int = 0
    localized_results: int = 0
    accepted: int = 0
    rejected: int = 0
    published: int = 0
    last_confidence: float = float("nan")
    last_reason: str = ""
    last_error: str = ""
    latency_ms: dict[str, float] = field(default_factory=dict)  # exponential moving averages
    end_to_end_ms: float = float("nan")                         # receipt -> published, last frame

    def smooth(self, name: str, value_ms: float, alpha: float = 0.2) -> None:
        old = self.latency_ms.get(name)
        self.latency_ms[name] = value_ms if old is None else (1 - alpha) * old + alpha * value_ms


class Health:
    """The windowed diagnostics of one activation (r2former_ros.health)."""

    def __init__(self, values: dict[str, Any], start: float) -> None:
        window = float(values["diagnostics_window"])
        self.images = health.FrequencyStatus("images", values["expected_image_rate_min"],
                                             values["expected_image_rate_max"], window, start=start)
        self.poses = health.FrequencyStatus("poses", values["expected_pose_rate_min"],
                                            values["expected_pose_rate_max"], window, start=start)
        self.input = health.InputTimeout("image", values["input_timeout_s"], start)
        self.errors = health.EventWindow(window)
        self.map_errors = health.EventWindow(window)
        self.malformed = health.EventWindow(window)
        self.tf_failures = health.EventWindow(window)
        self.subscription = health.SubscriptionMonitor("image", str(values["qos_reliability"]))
        self.tracking = health.TrackingMonitor(bool(values["tracking"]))
        self.odometry = health.OdometryMonitor(str(values["odom_topic"]), window)


@dataclass(frozen=True)
class Received:
    """An image message with its receipt time (ROS clock, ns: sim time under use_sim_time)."""
    msg: Image | CompressedImage
    receipt_ns: int


@dataclass(frozen=True)
class Outcome:
    """One frame's answer, from a single frame or from the tracker: what is published and what is drawn."""
    accepted: bool
    confidence: float
    reason: str
    pose: np.ndarray
    covariance: np.ndarray
    timings_ms: dict[str, float]
    frame: LocalizationResult | None      # the reranked candidates (markers, matches); None: frame not used
    tracked: TrackedResult | None = None

    @classmethod
    def single(cls, r: LocalizationResult) -> Outcome:
        return cls(r.accepted, float(r.confidence), r.reason, r.pose, r.covariance, r.timings_ms, r)

    @classmethod
    def tracking(cls, t: TrackedResult) -> Outcome:
        return cls(t.accepted, float(t.confidence), t.reason, t.pose, t.covariance, t.timings_ms, t.frame, t)


@dataclass(frozen=True)
class BaseEstimate:
    """The published pose: of base_frame in map_frame, with its covariance."""
    pose: np.ndarray
    covariance: np.ndarray


# ------------------------------------------------------------------------------- node

class LocalizeNode(LifecycleNode):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(NODE_NAME, **kwargs)
        declare_parameters(self, PARAMETERS)
        self._values = self._read_parameters()
        self._mount = mounting_from_parameter(self._values["camera_pose_in_base"])
        self.add_on_set_parameters_callback(self._check_live_parameters)
        self.add_post_set_parameters_callback(self._apply_live_parameters)
        self._model_path: Path | None = None
        self._model: Any = None
        self._localizer: Localizer | None = None
        self._localizer_lock = threading.Lock()   # guards swapping `_localizer` and the state machine
        self._reload_lock = threading.Lock()      # one map load at a time
        self._pending_map: tuple[str, Localizer] | None = None
        self._state = LocalizationStateMachine(self._values["localized_after"], self._values["lost_after"])
        self._initialpose_pending = False
        self._tracker: Tracker | None = None      # with tracking on; swapped under _localizer_lock
        self._tracker_request: tuple[str, Any] | None = None   # ("seed", (pose, cov)) / ("reset", why): worker
        self._odom: PoseBuffer | None = None
        self._odom_sub: Any = None
        self._initialpose_sub: Any = None
        self._sent_initialposes: deque[int] = deque(maxlen=32)   # stamps of our own initialpose messages
        self._maps_base_poses = True
        self._tf: TfClient | None = None
        self._map_to_odom: np.ndarray | None = None
        self._stats = Stats()
        self._health: Health | None = None
        self._camera_frame = ""
        self._slot: LatestFrameSlot[Received] | None = None
        self._worker: threading.Thread | None = None
        self._image_sub: Any = None
        self._timers: list[Any] = []
        self._last_matches_time = 0.0
        self._window = (time.monotonic(), 0, 0)   # (time, received, taken) at the last diagnostics
        self._publishers: list[Any] = []
        self._reload_srv: Any = None
        self._map_on_disk: health.MapOnDisk | None = None
        self._fault_frame_id = os.environ.get(FAULT_INJECTION_ENV, "")

    @property
    def autostart(self) -> bool:
        return bool(self._values["autostart"])

    # ------------------------------------------------------------- lifecycle
    def _read_parameters(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for spec in PARAMETERS:
            try:
                value = self.get_parameter(spec.name).value
            except ParameterUninitializedException:     # an empty array parameter
                value = None
            values[spec.name] = list(value or []) if isinstance(spec.default, list) else value
        return values

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            return self._configure()
        except Exception as exc:  # noqa: BLE001 - rclpy would turn it into a silent ERROR transition
            self.get_logger().error(f"configure failed: {type(exc).__name__}: {exc}")
            self._release()
            return TransitionCallbackReturn.FAILURE

    def _configure(self) -> TransitionCallbackReturn:
        values = self._read_parameters()
        t0 = time.perf_counter()
        try:
            self._model_path = resolve_model_path(values["model_path"], "parameter model_path")
            self._model = load_model(self._model_path, device=values["device"], precision=values["precision"])
            localizer = load_localizer(self._model, values["map_path"], values)
            self._mount = mounting_from_parameter(values["camera_pose_in_base"])
            Health(values, 0.0)                      # checks the expected rates
            self._values = values
            self._use_map(localizer)
            if values["publish_tf"] or (not self._maps_base_poses and self._mount is None):
                self._tf = make_tf_client(self)
        except EXPECTED_ERRORS as exc:
            self.get_logger().error(f"configure failed: {exc}")
            self._release()
            return TransitionCallbackReturn.FAILURE
        self._create_publishers()
        self._reload_srv = self.create_service(Trigger, "~/reload_map", self._on_reload,
                                               callback_group=MutuallyExclusiveCallbackGroup())
        m = localizer.map
        self.get_logger().info(
            f"configured in {time.perf_counter() - t0:.1f} s: map={values['map_path']} images={len(m)} "
            f"poses of {m.info.child_frame or '(unrecorded frame)'} in {m.info.parent_frame} -> published as "
            f"{values['base_frame']} in {values['map_frame']} ({self._frames_summary()}); model={self._model_path} "
            f"fingerprint={self._model.fingerprint} device={localizer.device}"
            f"{'; TF via ' + self._tf.backend if self._tf else ''}")
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            return self._activate(state)
        except Exception as exc:  # noqa: BLE001 - rclpy would turn it into a silent ERROR transition
            self.get_logger().error(f"activate failed: {type(exc).__name__}: {exc}")
            self._stop_processing()
            super().on_deactivate(state)
            return TransitionCallbackReturn.FAILURE

    def _activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        result = super().on_activate(state)          # enables the lifecycle publishers
        self._health = Health(self._values, time.monotonic())
        self._slot = LatestFrameSlot()
        self._worker = threading.Thread(target=self._work, args=(self._slot,), name="r2former-localize",
                                        daemon=True)
        self._worker.start()
        qos = stream_qos(self._values["qos_reliability"], self._values["qos_depth"])
        events = self._subscription_events()
        if self._values["image_transport"] == "compressed":
            sub = self.create_subscription(CompressedImage, "image/compressed", self._on_image, qos,
                                           event_callbacks=events)
        else:
            sub = self.create_subscription(Image, "image", self._on_image, qos, event_callbacks=events)
        self._image_sub = sub
        self._health.subscription.topic = sub.topic_name
        if self._values["odom_topic"]:
            self._odom = PoseBuffer(ODOM_BUFFER, tolerance=ODOM_TOLERANCE_S, max_gap=ODOM_MAX_GAP_S)
            self._odom_sub = self.create_subscription(Odometry, self._values["odom_topic"], self._on_odometry,
                                                      stream_qos("best_effort", 50))
        self._initialpose_sub = self.create_subscription(PoseWithCovarianceStamped, "initialpose",
                                                         self._on_initialpose, 10)
        rate = float(self._values["diagnostics_rate"])
        if rate > 0:
            self._timers.append(self.create_timer(1.0 / rate, self._publish_diagnostics))
        if self._values["publish_tf"]:
            self._timers.append(self.create_timer(1.0 / TF_REPUBLISH_HZ, self._republish_map_to_odom))
        self._publish_map_poses()
        self._publish_state()
        self.get_logger().info(f"active: subscribed {self._image_sub.topic_name} "
                               f"({self._values['qos_reliability']}/{self._values['qos_depth']}); "
                               f"{self._tracking_summary()}")
        return result

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_processing()
        self.get_logger().info("inactive: camera unsubscribed, nothing is published")
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release()
        self.get_logger().info("cleaned up: model and map freed")
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_processing()
        self._release()
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_processing()
        self._release()
        return TransitionCallbackReturn.SUCCESS

    def _create_publishers(self) -> None:
        create = self.create_lifecycle_publisher
        self._pose_pub = create(PoseWithCovarianceStamped, "~/pose", 10)
        self._matches_pub = create(Image, "~/matches", stream_qos("reliable", 1))
        self._candidates_pub = create(MarkerArray, "~/candidates", 10)
        self._map_poses_pub = create(PoseArray, "~/map_poses", latched_qos())
        self._state_pub = create(String, "~/state", latched_qos())
        self._diag_pub = create(DiagnosticArray, "/diagnostics", 10)
        self._initialpose_pub = create(PoseWithCovarianceStamped, "initialpose", 1)
        self._publishers = [self._pose_pub, self._matches_pub, self._candidates_pub, self._map_poses_pub,
                            self._state_pub, self._diag_pub, self._initialpose_pub]

    def _stop_processing(self) -> None:
        """Unsubscribe the camera, odometry and initialpose, stop the worker (it finishes its frame) and the
        timers; the tracker starts again from global search at the next activation."""
        for sub in (self._image_sub, self._odom_sub, self._initialpose_sub):
            if sub is not None:
                self.destroy_subscription(sub)
        self._image_sub = self._odom_sub = self._initialpose_sub = None
        for timer in self._timers:
            self.destroy_timer(timer)
        self._timers.clear()
        self.stop()
        with self._localizer_lock:        # a new filter: a worker that outlived stop() keeps the old one
            if self._tracker is not None and self._localizer is not None:
                self._tracker = make_tracker(self._localizer, self._values)
            self._tracker_request = None
        self._odom = None
        self._health = None          # inactive: nothing is published (see _swap_map, _on_image)

    def _release(self) -> None:
        """Free what configure created: publishers, service, TF, map and model."""
        for pub in self._publishers:
            self.destroy_lifecycle_publisher(pub)
        self._publishers = []
        if self._reload_srv is not None:
            self.destroy_service(self._reload_srv)
            self._reload_srv = None
        if self._tf is not None:
            self._tf.close()
            self._tf = None
        device = getattr(self._model, "device", None)
        with self._localizer_lock:
            self._localizer = None
            self._tracker = None
        self._model = None
        self._map_to_odom = None
        gc.collect()
        if device is not None and getattr(device, "type", "") == "cuda":
            import torch
            torch.cuda.empty_cache()

    def stop(self, timeout: float = 3.0) -> None:
        """Stop the worker thread (it finishes the frame it is on)."""
        if self._slot is not None:
            self._slot.close()
        worker, self._worker = self._worker, None
        if worker is not None and worker.is_alive() and worker is not threading.current_thread():
            worker.join(timeout)

    # -------------------------------------------------------------- parameters
    def _check_live_parameters(self, params: list[Parameter]) -> SetParametersResult:
        """Validate changes; a new map_path is loaded here (the change is refused when it fails)."""
        for p in params:
            spec = SPECS.get(p.name)
            reason = spec.check(p.value) if spec is not None else None
            if reason:
                return SetParametersResult(successful=False, reason=reason)
            if p.name == "camera_pose_in_base":
                try:
                    mounting_from_parameter(list(p.value or []))
                except FrameError as exc:
                    return SetParametersResult(successful=False, reason=str(exc))
        for p in params:
            if p.name == "map_path" and self._model is not None:
                localizer, reason = self._try_load_map(str(p.value))
                if localizer is None:
                    return SetParametersResult(successful=False, reason=f"map not loaded, keeping "
                                               f"{self._values['map_path']}: {reason}")
                self._pending_map = (str(p.value), localizer)
        return SetParametersResult(successful=True)

    def _apply_live_parameters(self, params: list[Parameter]) -> None:
        changed = {p.name: p.value for p in params if p.name in SPECS}
        if not changed:
            return
        if "camera_pose_in_base" in changed:
            changed["camera_pose_in_base"] = list(changed["camera_pose_in_base"] or [])
            self._mount = mounting_from_parameter(changed["camera_pose_in_base"])
            if self._mount is None and not self._maps_base_poses and self._tf is None and self._model is not None:
                try:
                    self._tf = make_tf_client(self)
                except EXPECTED_ERRORS as exc:
                    self.get_logger().error(str(exc))
        self._values = {**self._values, **changed}
        with self._localizer_lock:
            live_config = set(config_options(LocalizerConfig)) & set(changed)
            if self._localizer is not None and live_config:
                self._localizer.config = dataclasses.replace(
                    self._localizer.config, **{name: self._values[name] for name in live_config}).validate()
            self._state.localized_after = int(self._values["localized_after"])
            self._state.lost_after = int(self._values["lost_after"])
            restart = self._localizer is not None and bool(TRACKING_PARAMETERS & set(changed))
            if self._localizer is not None and restart:
                self._tracker = make_tracker(self._localizer, self._values)
                self._tracker_request = None
        if restart:
            if self._health is not None:
                self._health.tracking.enabled = self._tracker is not None
                self._health.tracking.reset("parameters changed")
            self.get_logger().info(f"tracking parameters changed: {self._tracking_summary()}")
        pending, self._pending_map = self._pending_map, None
        if pending is not None and "map_path" in changed:
            self._swap_map(*pending)

    # ------------------------------------------------------------------ input
    def _on_image(self, msg: Image | CompressedImage) -> None:
        now = time.monotonic()
        slot, h = self._slot, self._health
        if slot is None or h is None:
            return
        h.images.tick(now)
        h.input.seen(now)
        self._camera_frame = msg.header.frame_id
        slot.put(Received(msg, self.get_clock().now().nanoseconds))

    # ----------------------------------------------------------------- worker
    def _work(self, slot: LatestFrameSlot[Received]) -> None:
        while not slot.closed:
            frame = slot.take(timeout=0.5)
            if frame is None:
                continue
            try:
                self._process(frame.item, frame.received_at)
            except Exception as exc:  # noqa: BLE001 - the worker must survive anything one frame does
                if slot.closed or not rclpy.ok(context=self.context):
                    return
                self._count_error(exc)

    def _process(self, received: Received, received_at: float) -> None:
        """One frame: decode, localize (or track), express in the base frame, update the state, publish,
        record."""
        msg = received.msg
        stamp_ns = stamp_to_ns(msg.header.stamp) or received.receipt_ns   # zero stamp: receipt time
        rgb, decode_ms = self._decode(msg)
        if rgb is None:
            return
        with self._localizer_lock:
            localizer, tracker = self._localizer, self._tracker
            request, self._tracker_request = self._tracker_request, None
        if localizer is None:
            return
        if tracker is not None:
            self._apply_tracker_request(tracker, request)
            outcome = self._track(tracker, rgb, decode_ms, msg.header.frame_id, stamp_ns)
        else:
            outcome = Outcome.single(self._localize(localizer, rgb, decode_ms))
        self._inject_fault(msg)
        estimate = self._base_estimate(outcome, msg.header.frame_id, stamp_ns) if outcome.accepted else None
        decision = self._advance_state(localizer, outcome, published=estimate is not None)
        if decision is None:             # the map changed while we worked: stale result
            return
        transition, send_initialpose = decision
        self._publish_result(outcome, estimate, stamp_ns, send_initialpose)
        if transition is not None:
            self._on_transition(transition, outcome)
        self._publish_extras(rgb, outcome, localizer, msg.header, stamp_ns)
        self._record(outcome, estimate is not None, received_at)

    # --------------------------------------------------------------- tracking
    def _track(self, tracker: Tracker, rgb: np.ndarray, decode_ms: float, camera_frame: str,
               stamp_ns: int) -> Outcome:
        """The tracker's step for this frame, at the image's header stamp, with the odometry pose there."""
        odom_pose, why = self._odometry_at(stamp_ns, camera_frame)
        h = self._health
        if h is not None and self._odom is not None:
            h.odometry.frame(odom_pose is not None, why, time.monotonic())
        if odom_pose is None and why:
            self.get_logger().warning(f"frame without odometry: {why}", throttle_duration_sec=WARN_THROTTLE_SEC)
        result = tracker.step(stamp_ns / 1e9, rgb, odom_pose=odom_pose, decode_ms=decode_ms)
        if h is not None:
            h.tracking.frame(result.state, result.support, result.reranked, result.elsewhere, result.speed,
                             used=result.frame is not None, still=result.still, stamp=stamp_ns / 1e9,
                             frozen_view_m=result.frozen_view_m, coasted=result.coasted)
        return Outcome.tracking(result)

    def _apply_tracker_request(self, tracker: Tracker, request: tuple[str, Any] | None) -> None:
        """A seed from /initialpose or a reset, applied by the worker between frames (the tracker is not
        thread-safe)."""
        if request is None:
            return
        what, arg = request
        seeded = tracker.seed(*arg) if what == "seed" else 0
        if what == "seed" and seeded:
            message = f"tracker seeded from initialpose: {seeded} map entries near the pose"
        else:
            tracker.reset()
            message = (f"tracker reset to global search: {arg}" if what == "reset"
                       else "tracker reset to global search: no map entry near the initial pose")
        self.get_logger().info(message)
        if self._health is not None:
            self._health.tracking.reset(message)

    def _odometry_at(self, stamp_ns: int, camera_frame: str) -> tuple[np.ndarray | None, str]:
        """(odometry pose of the body the map poses describe at the image stamp, "") or (None, why not);
        (None, "") without odom_topic. Waits up to transform_timeout for a sample after the stamp."""
        buffer = self._odom
        if buffer is None:
            return None, ""
        stamp = stamp_ns / 1e9
        deadline = time.monotonic() + float(self._values["transform_timeout"])
        status, pose = buffer.lookup(stamp)
        while status is PoseLookup.WAIT and time.monotonic() < deadline:
            time.sleep(0.005)
            status, pose = buffer.lookup(stamp)
        if status is PoseLookup.WAIT:
            status, pose = buffer.lookup(stamp, final=True)
        if pose is None:
            newest = buffer.newest_stamp
            if newest is None:
                return None, f"no odometry received on {self._values['odom_topic']}"
            if newest < stamp:
                return None, f"odometry stale: the newest is {stamp - newest:.2f} s older than the image"
            return None, "no odometry around the image stamp (older than the buffer, or a gap)"
        if self._maps_base_poses:
            return pose, ""
        mount = self._mount
        if mount is None:
            try:
                mount = self._mount_from_tf(camera_frame, stamp_ns)
            except TransformUnavailable as exc:
                return None, f"camera mounting unknown: {exc}"
        return compose_poses(pose, mount), ""      # the camera's odometry pose: the map holds camera poses

    def _on_odometry(self, msg: Odometry) -> None:
        buffer, h = self._odom, self._health
        if buffer is None:
            return
        stamp = stamp_to_ns(msg.header.stamp) / 1e9
        newest = buffer.newest_stamp
        if newest is not None and stamp <= newest:
            if newest - stamp <= ODOM_RESET_JUMP_S:
                return                   # out of order or repeated: the buffer keeps its time order
            buffer.clear()               # a looped bag or a sim-time reset
        buffer.add(stamp, pose_from_msg(msg.pose.pose))
        if h is not None:
            h.odometry.message(time.monotonic())

    def _on_initialpose(self, msg: PoseWithCovarianceStamped) -> None:
        """Seed the tracker at an operator's (or another localizer's) initial pose of base_frame."""
        if stamp_to_ns(msg.header.stamp) in self._sent_initialposes:
            return                       # our own, published on each transition to localized
        frame = msg.header.frame_id.lstrip("/")
        if frame and frame != self._values["map_frame"]:
            self.get_logger().warning(f"initialpose in frame {frame!r} ignored: expected map_frame "
                                      f"{self._values['map_frame']!r}")
            return
        with self._localizer_lock:
            tracker, localizer = self._tracker, self._localizer
        if tracker is None or localizer is None:
            self.get_logger().info("initialpose ignored: tracking is off (single frames need no initial pose)")
            return
        pose = pose_from_msg(msg.pose.pose)
        cov = np.asarray(msg.pose.covariance, dtype=np.float64).reshape(6, 6)
        request: tuple[str, Any]
        if not np.all(np.isfinite(pose)) or np.linalg.norm(pose[3:]) < 1e-6:
            self.get_logger().warning("initialpose ignored: not a finite pose with a unit quaternion")
            return
        pose[3:] /= np.linalg.norm(pose[3:])
        if self._maps_base_poses:
            request = ("seed", (pose, cov))
        else:
            mount = self._mount
            if mount is None:
                try:
                    mount = self._mount_from_tf(self._camera_frame, 0)
                except TransformUnavailable as exc:
                    mount = None
                    request = ("reset", f"initialpose received, camera mounting unknown ({exc})")
            if mount is not None:
                request = ("seed", (compose_poses(pose, mount), cov))
        with self._localizer_lock:
            if self._tracker is tracker:
                self._tracker_request = request
        self.get_logger().info(f"initialpose at x={pose[0]:.2f} y={pose[1]:.2f}: "
                               f"{'seeding' if request[0] == 'seed' else 'resetting'} the tracker at the next frame")

    def _tracking_summary(self) -> str:
        tracker = self._tracker
        if tracker is None:
            return "tracking off (every frame localized on its own)"
        odom = self._values["odom_topic"]
        cfg = tracker.config
        top_k = tracker.localizer.config.top_k
        searching = min(cfg.global_candidates or top_k, top_k)
        odometry = (f"odometry from {odom}" if odom else "no odometry (the filter estimates the speed; measured "
                    "at vehicle speeds: a ground robot needs odom_topic, docs/TRACKING.md)")
        return (f"tracking on ({cfg.track_candidates} + {cfg.kidnap_candidates} candidates while tracking, "
                f"{searching} while searching, min_mass {cfg.min_mass:g}); {odometry}")

    def _decode(self, msg: Image | CompressedImage) -> tuple[np.ndarray | None, float]:
        """The RGB image, or None for a malformed one (counted, logged). The size limit is checked from the
        message or the PNG/JPEG header before anything is allocated."""
        t0 = time.perf_counter()
        try:
            rgb = msg_to_rgb(msg, max_pixels=int(self._values["max_image_pixels"]))
        except ImageDecodeError as exc:
            self._count_malformed(exc)
            return None, 0.0
        return rgb, (time.perf_counter() - t0) * 1e3

    # ------------------------------------------------------- input checking
    def _count_malformed(self, exc: ImageDecodeError) -> None:
        too_large = isinstance(exc, ImageTooLargeError)
        with self._stats.lock:
            self._stats.malformed += 1
            self._stats.too_large += int(too_large)
            self._stats.last_malformed = str(exc)
            total = self._stats.malformed
        if self._health is not None:
            self._health.malformed.add(time.monotonic())
        self.get_logger().warning(f"skipping image ({total} malformed so far): {exc}",
                                  throttle_duration_sec=WARN_THROTTLE_SEC)

    def _subscription_events(self) -> SubscriptionEventCallbacks:
        """QoS events of the image subscription, kept for diagnostics (why no image arrives)."""
        return SubscriptionEventCallbacks(incompatible_qos=self._on_incompatible_qos, matched=self._on_matched,
                                          message_lost=self._on_message_lost)

    def _on_incompatible_qos(self, info: QoSRequestedIncompatibleQoSInfo) -> None:
        policy = qos_policy_name_from_kind(info.last_policy_kind)
        if self._health is not None:
            self._health.subscription.incompatible(info.total_count, policy)
        self.get_logger().warning(
            f"a publisher on {self._image_sub.topic_name if self._image_sub else 'image'} has a QoS incompatible "
            f"with this subscription ({self._values['qos_reliability']}): policy {policy}; its images never "
            "arrive", throttle_duration_sec=WARN_THROTTLE_SEC)

    def _on_matched(self, info: QoSSubscriptionMatchedInfo) -> None:
        if self._health is not None:
            self._health.subscription.matched(info.current_count)

    def _on_message_lost(self, info: QoSMessageLostInfo) -> None:
        if self._health is not None:
            self._health.subscription.lost(info.total_count)

    # --------------------------------------------------------- fault handling
    def _inject_fault(self, msg: Image | CompressedImage) -> None:
        """Test hook (module doc): raise in the pose step for images of the configured frame id."""
        if self._fault_frame_id and msg.header.frame_id == self._fault_frame_id:
            raise InjectedFault(f"fault injected for frame_id {self._fault_frame_id!r} "
                                f"({FAULT_INJECTION_ENV})")

    def _try_load_map(self, map_path: str) -> tuple[Localizer | None, str]:
        """(the map's localizer, "") or (None, why it cannot be used). Never raises: a damaged map, a map of
        another model or a bug in the loader must leave the node serving the map it has."""
        try:
            return self._load_map(map_path), ""
        except EXPECTED_ERRORS as exc:
            return None, str(exc)
        except Exception as exc:  # noqa: BLE001 - a service or parameter callback must not end the process
            self.get_logger().error(f"loading map {map_path} failed unexpectedly: {type(exc).__name__}: {exc}")
            return None, f"{type(exc).__name__}: {exc}"

    def _map_status(self, now: float) -> health.Status:
        """The map on disk (deleted / replaced since loaded) and errors reading its files (ERROR)."""
        on_disk = self._map_on_disk.status() if self._map_on_disk is not None else health.Status(health.OK, "")
        parts = [on_disk]
        if self._health is not None:
            count = self._health.map_errors.count(now)
            if count:
                with self._stats.lock:
                    last = self._stats.last_map_error
                parts.append(health.Status(health.ERROR, f"{count} frames failed reading the map in the last "
                                           f"{self._health.map_errors.window:g} s ({last}): the map's files changed "
                                           "under the node; rebuild or restore it, then ~/reload_map"))
        return health.merge(parts)

    def _input_status(self, h: Health, now: float) -> health.Status:
        """Input rate and timeout, with the reason when no image arrives (publishers, QoS events)."""
        status = health.merge([h.images.status(now), h.input.status(now)])
        topic = self._image_sub.topic_name if self._image_sub is not None else h.subscription.topic
        try:
            publishers = self.count_publishers(topic)
        except Exception:  # noqa: BLE001 - the graph is not available while shutting down
            publishers = 0
        status.values.extend(h.subscription.values(publishers))
        if status.level >= health.ERROR:
            reason = h.subscription.why_no_input(publishers)
            if reason:
                status.message = f"{status.message}: {reason}"
        return status

    def _current_localizer(self) -> Localizer | None:
        with self._localizer_lock:
            return self._localizer

    def _localize(self, localizer: Localizer, rgb: np.ndarray, decode_ms: float) -> LocalizationResult:
        result = localizer.localize(rgb, decode_ms=decode_ms)
        return result.judge(float(self._values["min_confidence"]))   # it can change at run time

    def _base_estimate(self, result: Outcome, camera_frame: str, stamp_ns: int) -> BaseEstimate | None:
        """The pose of base_frame for an accepted result: as it is for a map of base poses, else the camera
        pose composed with the mounting. None (counted, warned) when the mounting is not available in TF."""
        if self._maps_base_poses:
            return BaseEstimate(result.pose, result.covariance)
        mount = self._mount
        if mount is None:
            try:
                mount = self._mount_from_tf(camera_frame, stamp_ns)
            except TransformUnavailable as exc:
                with self._stats.lock:
                    self._stats.tf_failures += 1
                    self._stats.last_error = f"TF: {exc}"
                if self._health is not None:
                    self._health.tf_failures.add(time.monotonic())
                self.get_logger().warning(f"pose not published: camera mounting unknown: {exc}",
                                          throttle_duration_sec=WARN_THROTTLE_SEC)
                return None
        pose, cov = camera_to_base(result.pose, result.covariance, mount)
        return BaseEstimate(pose, cov)

    def _mount_from_tf(self, camera_frame: str, stamp_ns: int) -> np.ndarray:
        if self._tf is None:
            raise TransformUnavailable("camera_pose_in_base is empty and TF is not available")
        with self._localizer_lock:
            fallback = self._localizer.map.info.child_frame if self._localizer is not None else ""
        frame = camera_frame or fallback
        mount = self._tf.lookup(self._values["base_frame"], frame, stamp_ns, float(self._values["transform_timeout"]))
        return optical_to_body(mount) if is_optical_frame(frame) else mount

    def _advance_state(self, localizer: Localizer, result: Outcome,
                       published: bool) -> tuple[Transition | None, bool] | None:
        """Feed the state machine (the tracker's state with tracking on); (transition, send initialpose now),
        or None when the map was swapped."""
        with self._localizer_lock:
            if localizer is not self._localizer:
                return None
            if result.tracked is not None:
                transition = self._state.follow(result.tracked.state, result.accepted and published)
            else:
                transition = self._state.update(result.accepted and published)
            if transition is not None:
                self._initialpose_pending = transition.current == LOCALIZED
            send = (self._initialpose_pending and self._state.state == LOCALIZED and published
                    and bool(self._values["publish_initialpose"])
                    and result.confidence >= float(self._values["initialpose_min_confidence"]))
            if send:
                self._initialpose_pending = False
            return transition, send

    def _publish_result(self, result: Outcome, estimate: BaseEstimate | None, stamp_ns: int,
                        send_initialpose: bool) -> None:
        if estimate is None:
            return
        pose = pose_with_covariance_msg(estimate.pose, estimate.covariance, self._values["map_frame"],
                                        ns_to_stamp(stamp_ns))
        self._pose_pub.publish(pose)
        if self._health is not None:
            self._health.poses.tick(time.monotonic())
        if send_initialpose:
            self._sent_initialposes.append(stamp_ns)     # not a seed for our own tracker
            self._initialpose_pub.publish(pose)
            self.get_logger().info(f"published {self._initialpose_pub.topic_name} "
                                   f"(confidence {result.confidence:.2f})")
        if self._values["publish_tf"]:
            self._update_map_to_odom(estimate.pose, stamp_ns)

    def _update_map_to_odom(self, base_in_map: np.ndarray, stamp_ns: int) -> None:
        """map -> odom from the published base pose and odom -> base at the same stamp (AMCL's rule)."""
        if self._tf is None:
            return
        try:
            base_in_odom = self._tf.lookup(self._values["odom_frame"], self._values["base_frame"], stamp_ns,
                                           float(self._values["transform_timeout"]))
        except TransformUnavailable as exc:
            with self._stats.lock:
                self._stats.tf_failures += 1
            if self._health is not None:
                self._health.tf_failures.add(time.monotonic())
            self.get_logger().warning(f"map -> odom not updated: {exc}", throttle_duration_sec=WARN_THROTTLE_SEC)
            return
        self._map_to_odom = odom_in_map(base_in_map, base_in_odom)
        tolerance_ns = int(float(self._values["transform_tolerance"]) * 1e9)
        self._tf.send(self._values["map_frame"], self._values["odom_frame"], self._map_to_odom,
                      stamp_ns + tolerance_ns)

    def _republish_map_to_odom(self) -> None:
        """Keep the last map -> odom alive between localizations (post-dated by transform_tolerance)."""
        if self._map_to_odom is None or self._tf is None:
            return
        stamp_ns = self.get_clock().now().nanoseconds + int(float(self._values["transform_tolerance"]) * 1e9)
        self._tf.send(self._values["map_frame"], self._values["odom_frame"], self._map_to_odom, stamp_ns)

    def _publish_extras(self, rgb: np.ndarray, result: Outcome, localizer: Localizer, header: Header,
                        stamp_ns: int) -> None:
        if result.frame is None:         # a frame the tracker did not use (duplicate or out-of-order stamp)
            return
        stamp = ns_to_stamp(stamp_ns)
        if self._candidates_pub.get_subscription_count() > 0:
            self._candidates_pub.publish(candidate_markers(
                result.frame.candidates, self._values["map_frame"], stamp,
                max_markers=int(self._values["num_candidate_markers"])))
        self._maybe_publish_matches(rgb, result, result.frame, localizer, header, stamp)

    def _record(self, result: Outcome, published: bool, received_at: float) -> None:
        with self._stats.lock:
            s = self._stats
            s.localized_results += 1
            s.accepted += int(result.accepted)
            s.rejected += int(not result.accepted)
            s.published += int(published)
            s.last_confidence = float(result.confidence)
            s.last_reason = result.reason
            for name in STAGES:
                if name in result.timings_ms:
                    s.smooth(name, float(result.timings_ms[name]))
            s.end_to_end_ms = (time.monotonic() - received_at) * 1e3

    def _count_error(self, exc: Exception) -> None:
        map_error = isinstance(exc, MapError)
        with self._stats.lock:
            self._stats.errors += 1
            self._stats.map_errors += int(map_error)
            self._stats.last_error = f"{type(exc).__name__}: {exc}"
            if map_error:
                self._stats.last_map_error = str(exc)
        if self._health is not None:
            self._health.errors.add(time.monotonic())
            if map_error:
                self._health.map_errors.add(time.monotonic())
        self.get_logger().error(f"localization failed: {type(exc).__name__}: {exc}",
                                throttle_duration_sec=WARN_THROTTLE_SEC)

    def _on_transition(self, transition: Transition, result: Outcome) -> None:
        self.get_logger().info(f"state {transition.previous} -> {transition.current} "
                               f"(confidence {result.confidence:.2f}{', ' + result.reason if result.reason else ''})")
        self._publish_state()

    def _maybe_publish_matches(self, rgb, result: Outcome, frame: LocalizationResult, localizer: Localizer,
                               header: Header, stamp) -> None:
        rate = float(self._values["matches_rate"])
        now = time.monotonic()
        if rate <= 0 or now - self._last_matches_time < 1.0 / rate:
            return
        if self._matches_pub.get_subscription_count() == 0:
            return
        self._last_matches_time = now
        best = frame.best
        thumb = localizer.map.thumbnail(best.index) if best is not None else None
        lines = [f"{self._state.state}  confidence {result.confidence:.2f}"
                 f"{'' if result.accepted else '  rejected: ' + result.reason}"]
        t = result.tracked
        if t is not None:
            lines.append(f"tracking: {t.state}  support {t.support}  reranked {t.reranked}  "
                         f"elsewhere {t.elsewhere:.2f}  speed {t.speed:.1f} m/s"
                         f"{'  standing (view unchanged)' if t.still else ''}"
                         f"{'  coasting (moved < update_spacing)' if t.coasted else ''}")
        if best is not None:
            lines.append(f"best #{best.index} {best.name}  score {best.score:.3f}  global {best.global_score:.3f}"
                         f"  rerank {best.rerank_score:.3f}")
        height, width = localizer.model.cfg.image_size
        image = draw_matches(rgb, thumb, frame.matches, model_size=(int(height), int(width)),
                             num_lines=int(self._values["num_match_lines"]), text=lines)
        out = rgb_to_image_msg(image, encoding="rgb8")
        out.header.stamp = stamp
        out.header.frame_id = header.frame_id
        self._matches_pub.publish(out)

    # ------------------------------------------------------------------ map
    def _load_map(self, map_path: str) -> Localizer:
        with self._reload_lock:
            return load_localizer(self._model, map_path, self._values)

    def _use_map(self, localizer: Localizer) -> None:
        """Make `localizer` current: frames of its poses, fresh state machine."""
        info = localizer.map.info
        base = self._values["base_frame"]
        if info.parent_frame != self._values["map_frame"]:
            self.get_logger().warning(f"map {info.path} holds poses in frame {info.parent_frame!r}; they are "
                                      f"published in map_frame {self._values['map_frame']!r}")
        warning = map_pose_warning(info.child_frame, base, str(info.path))
        if warning:
            self.get_logger().warning(warning, once=True)
        with self._localizer_lock:
            self._localizer = localizer
            self._map_on_disk = health.MapOnDisk(info.path)
            self._maps_base_poses = poses_are_base(info.child_frame, base)
            self._state = LocalizationStateMachine(self._values["localized_after"], self._values["lost_after"])
            self._initialpose_pending = False
            self._tracker = make_tracker(localizer, self._values)
            self._tracker_request = None
        if self._health is not None:
            self._health.tracking.reset("map changed")

    def _swap_map(self, map_path: str, localizer: Localizer) -> None:
        self._use_map(localizer)
        self._values = {**self._values, "map_path": map_path}
        if self._health is not None:    # active only: late subscribers get the new map and state
            self._publish_map_poses()
            self._publish_state()
        self.get_logger().info(f"map {map_path} in use ({len(localizer.map)} images; {self._frames_summary()})")

    def _frames_summary(self) -> str:
        if self._maps_base_poses:
            return "map poses published as they are"
        if self._mount is not None:
            return "camera poses composed with camera_pose_in_base"
        return "camera poses composed with the mounting from TF"

    def _on_reload(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        map_path = str(self.get_parameter("map_path").value)
        t0 = time.perf_counter()
        localizer, reason = self._try_load_map(map_path)
        if localizer is None:
            response.success = False
            response.message = f"map not reloaded, keeping the loaded map: {reason}"
            self.get_logger().error(response.message)
            return response
        self._swap_map(map_path, localizer)
        response.success = True
        response.message = f"loaded {map_path} ({len(localizer.map)} images) in {time.perf_counter() - t0:.2f} s"
        return response

    # ------------------------------------------------------------ publishing
    def _publish_state(self) -> None:
        self._state_pub.publish(String(data=self._state.state))

    def _publish_map_poses(self) -> None:
        localizer = self._current_localizer()
        if localizer is not None:
            self._map_poses_pub.publish(pose_array_msg(localizer.map.poses, self._values["map_frame"],
                                                       self.get_clock().now().to_msg()))

    def _publish_diagnostics(self) -> None:
        h, slot, localizer = self._health, self._slot, self._current_localizer()
        if h is None or slot is None or localizer is None:
            return
        now = time.monotonic()
        counts = slot.counts()
        t_prev, rec_prev, taken_prev = self._window
        dt = max(now - t_prev, 1e-6)
        self._window = (now, counts.received, counts.taken)
        with self._stats.lock:
            s = dataclasses.replace(self._stats, latency_ms=dict(self._stats.latency_ms), lock=threading.Lock())
        with self._localizer_lock:
            state = self._state.state
        name = self.get_fully_qualified_name().lstrip("/")    # robot1/r2former_localizer in a namespace
        hardware_id = self._values["hardware_id"] or self._camera_frame or "camera (no image yet)"
        images = self._input_status(h, now)
        map_status = self._map_status(now)
        poses = h.poses.status(now)
        errors, malformed, tf_failures = (w.count(now) for w in (h.errors, h.malformed, h.tf_failures))
        tracking, odometry = h.tracking.status(), h.odometry.status(now)
        tracking_values = dict(tracking.values)
        details = [s.last_reason] if s.last_reason and state != LOCALIZED else []
        if h.tracking.enabled:
            details.append(f"filter {tracking_values['tracking_state']}")
        parts = [health.Status(health.OK if state == LOCALIZED else health.WARN,
                               state + (f" ({'; '.join(details)})" if details else ""))]
        window = f"{h.errors.window:g} s"
        if errors:
            parts.append(health.Status(health.WARN, f"{errors} errors in the last {window}: {s.last_error}"))
        if malformed:
            parts.append(health.Status(health.WARN, f"{malformed} malformed images in the last {window} (last: "
                                       f"{s.last_malformed})"))
        if map_status.level > health.OK:
            parts.append(health.Status(map_status.level, map_status.message))
        if tf_failures:
            parts.append(health.Status(health.WARN, f"{tf_failures} TF lookups failed in the last {window}"))
        if odometry.level > health.OK:
            parts.append(health.Status(odometry.level, odometry.message))
        if tracking.level > health.OK:
            parts.append(health.Status(tracking.level, tracking.message))
        if images.level >= health.ERROR:
            parts.append(health.Status(images.level, images.message))
        summary = health.merge(parts)
        values: list[tuple[str, Any]] = [
            ("state", state),
            ("confidence", f"{s.last_confidence:.3f}"),
            ("input_rate_hz", f"{(counts.received - rec_prev) / dt:.2f}"),
            ("processed_rate_hz", f"{(counts.taken - taken_prev) / dt:.2f}"),
            ("received", counts.received), ("processed", counts.taken), ("dropped", counts.dropped),
            ("pending", counts.pending), ("malformed", s.malformed), ("too_large", s.too_large),
            ("last_malformed", s.last_malformed), ("errors", s.errors), ("last_error", s.last_error),
            ("map_errors", s.map_errors),
            ("tf_failures", s.tf_failures), ("accepted", s.accepted), ("rejected", s.rejected),
            ("published", s.published),
            *((f"latency_{n}_ms", f"{s.latency_ms[n]:.2f}") for n in STAGES if n in s.latency_ms),
            ("latency_end_to_end_ms", f"{s.end_to_end_ms:.2f}"),
            ("device", str(localizer.device)), ("precision", localizer.model.precision),
            ("rerank_precision", localizer.model.rerank_precision),
            ("reranked", tracking_values.get("tracking_reranked", localizer.last_reranked)),
            *tracking.values, *odometry.values,
            ("map_search_device", localizer.map.search_device), ("map_size", len(localizer.map)),
            ("map_path", self._values["map_path"]), *map_status.values, ("model_path", str(self._model_path)),
            ("model_fingerprint", localizer.model.fingerprint),
            ("map_child_frame", localizer.map.info.child_frame), ("base_frame", self._values["base_frame"]),
            ("frames", self._frames_summary()),
        ]
        statuses = [self._status(f"{name}: input images", hardware_id, images),
                    self._status(f"{name}: published poses", hardware_id, poses),
                    self._status(f"{name}: localization", hardware_id,
                                 health.Status(summary.level, summary.message, [(k, str(v)) for k, v in values]))]
        array = DiagnosticArray(status=statuses)
        array.header.stamp = self.get_clock().now().to_msg()
        self._diag_pub.publish(array)

    @staticmethod
    def _status(name: str, hardware_id: str, status: health.Status) -> DiagnosticStatus:
        return DiagnosticStatus(level=bytes([status.level]), name=name, message=status.message,
                                hardware_id=hardware_id, values=[KeyValue(key=k, value=v) for k, v in status.values])


def main(args: list[str] | None = None) -> int:
    rclpy.init(args=args)
    node: LocalizeNode | None = None
    try:
        node = LocalizeNode()
        executor = MultiThreadedExecutor(num_threads=2)
        executor.add_node(node)
        if node.autostart and node.trigger_configure() == TransitionCallbackReturn.SUCCESS:
            node.trigger_activate()
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except EXPECTED_ERRORS as exc:       # parameters that cannot even be declared
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
