"""Diagnostic levels computed over a time window, as diagnostic_updater does them. No rclpy.

* `FrequencyStatus`: the rate of events (images received, poses published) over the last
  `window` seconds against a minimum and maximum expected rate, with a tolerance - the checks of
  diagnostic_updater's FrequencyStatus ("No events recorded." ERROR, "Frequency too low." /
  "Frequency too high." WARN, else OK). A minimum of 0 means no events are fine.
* `InputTimeout`: ERROR when the last event is older than `timeout` seconds, STALE when no event
  ever arrived within `timeout` of the start (the camera never published).
* `EventWindow`: events (errors, malformed images) of the last `window` seconds: a transient error
  raises WARN while it is in the window and clears after it.
* `merge` combines statuses like DiagnosticStatusWrapper.mergeSummary: the highest level wins and the
  messages of that level are joined.
* `SubscriptionMonitor`: what the image subscription's QoS events say (publishers matched, publishers
  with an incompatible QoS and the policy, messages lost in the middleware), turned into the reason
  why no image arrives.
* `MapOnDisk`: whether the map directory a node loaded is still the one on disk (deleted, replaced).
* `TrackingMonitor`: what the tracker did per frame (filter state, support, candidates reranked and their
  mean, "elsewhere" probability, speed), or that tracking is off.
* `OdometryMonitor`: whether each frame had an odometry pose at its stamp (and why not): WARN while frames
  are predicted without the odometry the node was told to use.

Levels are the values of diagnostic_msgs/DiagnosticStatus (OK 0, WARN 1, ERROR 2, STALE 3).
Times are seconds from a monotonic clock, passed in (`now`) so the logic is testable.
"""
from __future__ import annotations

import os
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from r2former_core.errors import ConfigError

OK, WARN, ERROR, STALE = 0, 1, 2, 3
LEVEL_NAMES = {OK: "OK", WARN: "WARN", ERROR: "ERROR", STALE: "STALE"}
MAX_EVENTS = 100_000     # bound on remembered event times (far above any window x rate used here)
FROZEN_VIEW_WARN_M = 5.0  # odometry metres with an unchanged camera view before diagnostics warn (frozen camera)


@dataclass
class Status:
    level: int
    message: str
    values: list[tuple[str, str]] = field(default_factory=list)


def merge(statuses: list[Status]) -> Status:
    """Highest level; messages of that level joined with '; '; values concatenated."""
    top = max(s.level for s in statuses)
    message = "; ".join(s.message for s in statuses if s.level == top and s.message)
    return Status(top, message, [kv for s in statuses for kv in s.values])


class EventWindow:
    """Times of the events of the last `window` seconds (thread-safe)."""

    def __init__(self, window: float) -> None:
        if window <= 0:
            raise ConfigError(f"window must be > 0 s, got {window}")
        self.window = float(window)
        self._times: deque[float] = deque(maxlen=MAX_EVENTS)
        self._lock = threading.Lock()
        self.total = 0
        self.last: float | None = None

    def add(self, now: float) -> None:
        with self._lock:
            self._times.append(now)
            self.total += 1
            self.last = now

    def count(self, now: float) -> int:
        with self._lock:
            while self._times and self._times[0] < now - self.window:
                self._times.popleft()
            return len(self._times)


class FrequencyStatus:
    """Event rate over a window against [min_rate, max_rate] (Hz) with a relative `tolerance`."""

    def __init__(self, name: str, min_rate: float, max_rate: float, window: float = 5.0, tolerance: float = 0.1,
                 start: float = 0.0) -> None:
        if min_rate < 0 or max_rate <= 0 or min_rate > max_rate:
            raise ConfigError(f"{name}: expected rates need 0 <= min ({min_rate}) <= max ({max_rate}), max > 0")
        self.name, self.min_rate, self.max_rate, self.tolerance = name, float(min_rate), float(max_rate), tolerance
        self.events = EventWindow(window)
        self.start = start

    def tick(self, now: float) -> None:
        self.events.add(now)

    def rate(self, now: float) -> tuple[int, float, float]:
        """(events in the window, window duration, rate in Hz); the window is shorter right after start."""
        duration = max(min(self.events.window, now - self.start), 1e-9)
        count = self.events.count(now)
        return count, duration, count / duration

    def status(self, now: float) -> Status:
        count, duration, rate = self.rate(now)
        values = [(f"{self.name} events in window", str(count)),
                  (f"{self.name} events since start", str(self.events.total)),
                  (f"{self.name} window (s)", f"{duration:.2f}"), (f"{self.name} rate (Hz)", f"{rate:.2f}"),
                  (f"{self.name} minimum rate (Hz)", f"{self.min_rate:g}"),
                  (f"{self.name} maximum rate (Hz)", f"{self.max_rate:g}")]
        if count == 0 and self.min_rate > 0:
            return Status(ERROR, f"{self.name}: no events recorded in {duration:.1f} s", values)
        if rate < self.min_rate * (1 - self.tolerance):
            return Status(WARN, f"{self.name}: frequency too low ({rate:.2f} Hz < {self.min_rate:g} Hz)", values)
        if rate > self.max_rate * (1 + self.tolerance):
            return Status(WARN, f"{self.name}: frequency too high ({rate:.2f} Hz > {self.max_rate:g} Hz)", values)
        return Status(OK, f"{self.name}: desired frequency met ({rate:.2f} Hz)", values)


class InputTimeout:
    """ERROR when the newest input is older than `timeout` s; STALE when none arrived since `start`."""

    def __init__(self, name: str, timeout: float, start: float) -> None:
        if timeout <= 0:
            raise ConfigError(f"{name}: timeout must be > 0 s, got {timeout}")
        self.name, self.timeout, self.start = name, float(timeout), start
        self.last: float | None = None

    def seen(self, now: float) -> None:
        self.last = now

    def status(self, now: float) -> Status:
        if self.last is None:
            waited = now - self.start
            if waited > self.timeout:
                return Status(STALE, f"no {self.name} received in {waited:.1f} s since activation",
                              [(f"{self.name} age (s)", "never")])
            return Status(OK, "", [(f"{self.name} age (s)", "never")])
        age = now - self.last
        values = [(f"{self.name} age (s)", f"{age:.2f}")]
        if age > self.timeout:
            return Status(ERROR, f"no {self.name} for {age:.1f} s (input_timeout_s {self.timeout:g})", values)
        return Status(OK, "", values)


class SubscriptionMonitor:
    """Counters fed by a subscription's QoS event callbacks (thread-safe; no rclpy here).

    `matched(current)` from the `matched` event (publishers whose QoS fits), `incompatible(total, policy)`
    from `incompatible_qos` (a publisher that can never deliver, e.g. best_effort to a reliable
    subscription), `lost(total)` from `message_lost` (samples the middleware dropped, e.g. fragments of
    large best-effort images)."""

    def __init__(self, topic: str, reliability: str) -> None:
        self.topic, self.reliability = topic, reliability
        self._lock = threading.Lock()
        self.matched_publishers: int | None = None     # None: no matched event yet
        self.incompatible_events = 0
        self.incompatible_policy = ""
        self.lost_messages = 0

    def matched(self, current_count: int) -> None:
        with self._lock:
            self.matched_publishers = int(current_count)

    def incompatible(self, total_count: int, policy: str) -> None:
        with self._lock:
            self.incompatible_events = int(total_count)
            self.incompatible_policy = policy

    def lost(self, total_count: int) -> None:
        with self._lock:
            self.lost_messages = int(total_count)

    def values(self, publishers: int) -> list[tuple[str, str]]:
        with self._lock:
            matched = "unknown" if self.matched_publishers is None else str(self.matched_publishers)
            return [("publishers", str(publishers)), ("matched publishers", matched),
                    ("incompatible QoS events", str(self.incompatible_events)),
                    ("incompatible QoS policy", self.incompatible_policy or "none"),
                    ("messages lost", str(self.lost_messages))]

    def why_no_input(self, publishers: int) -> str:
        """Why no image arrives, from what the graph and the events say ("" when nothing explains it).

        `publishers` counts every publisher on the topic, compatible or not (`count_publishers`)."""
        with self._lock:
            matched, incompatible = self.matched_publishers, self.incompatible_events
            policy, lost = self.incompatible_policy, self.lost_messages
        if publishers == 0:
            return f"no publisher on {self.topic}"
        if incompatible and not matched:
            hint = (" (the subscription is reliable: a best_effort camera needs qos_reliability best_effort)"
                    if "RELIABILITY" in policy.upper() and self.reliability == "reliable" else "")
            return (f"{publishers} publisher(s) on {self.topic}, none with a compatible QoS "
                    f"({incompatible} incompatible-QoS event(s), policy {policy}){hint}")
        if lost:
            return (f"{lost} message(s) lost in the middleware on {self.topic} (large best-effort images between "
                    "processes need the Fast DDS shared-memory profile, config/fastdds_shm.xml)")
        return f"{publishers} publisher(s) on {self.topic}, but no message arrived"


@dataclass(frozen=True)
class FileIdentity:
    device: int
    inode: int
    mtime_ns: int
    size: int

    @classmethod
    def of(cls, path: Path) -> FileIdentity | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return cls(st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


class MapOnDisk:
    """Is the map a node loaded still the map at its path? (A loaded map keeps working when its directory is
    deleted or replaced: its arrays are in memory and its big files are read through descriptors opened at
    load, which keep the old files alive. The node should still say so: a restart would load something else.)
    """

    def __init__(self, map_dir: Path, marker: str = "map.json") -> None:
        self.path = Path(map_dir)
        self.marker = marker
        self.loaded = FileIdentity.of(self.path / marker)

    def status(self) -> Status:
        current = FileIdentity.of(self.path / self.marker)
        if current is not None and current == self.loaded:
            return Status(OK, "", [("map on disk", "as loaded")])
        if current is None:
            what = (f"map {self.path} was deleted (or is unreadable) since it was loaded; the node serves the "
                    "copy it loaded, a restart would fail")
            return Status(WARN, what, [("map on disk", "deleted")])
        return Status(WARN, f"map {self.path} was replaced on disk since it was loaded; the node serves the map it "
                            "loaded: call ~/reload_map to use the new one", [("map on disk", "replaced")])


class TrackingMonitor:
    """The tracker's per-frame figures for diagnostics (thread-safe). `enabled` False: tracking off."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._lock = threading.Lock()
        self.state = "global"
        self.support = 0
        self.reranked = 0
        self.reranked_total = 0
        self.frames = 0                 # frames the filter used (duplicates and out-of-order ones are not)
        self.skipped = 0
        self.elsewhere = float("nan")
        self.speed = float("nan")
        self.resets = 0
        self.last_reset = ""
        self.still_frames = 0           # frames of a standing robot: the view unchanged, nothing reranked
        self.coasted_frames = 0         # frames too near the last used one (update_spacing): nothing reranked
        self.frozen_view_m = 0.0        # odometry distance driven while the camera's view did not change
        self._standing_since: float | None = None
        self.standing_s = 0.0

    def frame(self, state: str, support: int, reranked: int, elsewhere: float, speed: float, used: bool = True,
              still: bool = False, stamp: float = 0.0, frozen_view_m: float = 0.0, coasted: bool = False) -> None:
        with self._lock:
            self.state, self.support, self.elsewhere, self.speed = state, int(support), float(elsewhere), float(speed)
            if used:
                self.frozen_view_m = float(frozen_view_m)
                self.frames += 1
                self.reranked = int(reranked)
                self.reranked_total += int(reranked)
                self.still_frames += int(still)
                self.coasted_frames += int(coasted)
                if not still:
                    self._standing_since, self.standing_s = None, 0.0
                else:
                    if self._standing_since is None:
                        self._standing_since = float(stamp)
                    self.standing_s = float(stamp) - self._standing_since
            else:
                self.skipped += 1

    def reset(self, why: str) -> None:
        with self._lock:
            self.state = "global"
            self.support = 0
            self.resets += 1
            self.last_reset = why

    def status(self) -> Status:
        if not self.enabled:
            return Status(OK, "", [("tracking", "off"), ("tracking_state", "off (every frame on its own)")])
        with self._lock:
            frozen = self.frozen_view_m
            mean = self.reranked_total / self.frames if self.frames else float("nan")
            values = [("tracking", "on"), ("tracking_state", self.state), ("tracking_support", str(self.support)),
                      ("tracking_reranked", str(self.reranked)), ("tracking_reranked_mean", f"{mean:.1f}"),
                      ("tracking_frames", str(self.frames)), ("tracking_frames_skipped", str(self.skipped)),
                      ("tracking_elsewhere", f"{self.elsewhere:.3f}"), ("tracking_speed_mps", f"{self.speed:.2f}"),
                      ("tracking_still_frames", str(self.still_frames)),
                      ("tracking_coasted_frames", str(self.coasted_frames)),
                      ("tracking_standing_s", f"{self.standing_s:.1f}"),
                      ("tracking_frozen_view_m", f"{self.frozen_view_m:.1f}"),
                      ("tracking_resets", str(self.resets)), ("tracking_last_reset", self.last_reset)]
        if frozen >= FROZEN_VIEW_WARN_M:
            return Status(WARN, f"the camera's view has not changed while the odometry moved {frozen:.0f} m "
                                f"(a frozen camera or driver?)", values)
        return Status(OK, "", values)


class OdometryMonitor:
    """Odometry for the tracker (the node's odom_topic): messages received and, per frame, whether a pose at
    the frame's stamp was found and why not (thread-safe). An empty topic means no odometry is used."""

    def __init__(self, topic: str, window: float) -> None:
        self.topic = topic
        self._lock = threading.Lock()
        self.missing_events = EventWindow(window)
        self.messages = 0
        self.last_message: float | None = None
        self.used = 0
        self.missing = 0
        self.last = "no frame yet"
        self.last_missing = ""

    def message(self, now: float) -> None:
        with self._lock:
            self.messages += 1
            self.last_message = now

    def frame(self, used: bool, reason: str, now: float) -> None:
        with self._lock:
            if used:
                self.used += 1
                self.last = "used"
            else:
                self.missing += 1
                self.last = self.last_missing = reason
        if not used:
            self.missing_events.add(now)

    def status(self, now: float) -> Status:
        if not self.topic:
            return Status(OK, "", [("odometry", "off (odom_topic empty)")])
        with self._lock:
            age = "never" if self.last_message is None else f"{now - self.last_message:.2f}"
            values = [("odometry", self.last), ("odom_topic", self.topic), ("odometry_messages", str(self.messages)),
                      ("odometry_age_s", age), ("odometry_used", str(self.used)),
                      ("odometry_missing", str(self.missing)), ("odometry_last_missing", self.last_missing)]
            last_missing = self.last_missing
        count = self.missing_events.count(now)
        if count:
            return Status(WARN, f"{count} frames without odometry in the last {self.missing_events.window:g} s "
                                f"({last_missing}): predicted without it", values)
        return Status(OK, "", values)
