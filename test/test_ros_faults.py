"""Faults around the running nodes (docs/RELIABILITY.md §5), each a test.

The localize node runs in its own process (one node for the tests of this module, in file order) with a
reliable image subscription and `R2FORMER_INJECT_FAULT_FRAME_ID=inject-fault` (the node's documented test
hook: images with that frame id raise in the pose step of the worker). Its camera is the project's
`bag_player` in its own process, looping a bag. Then:

* started before the camera, and a publisher whose QoS cannot match (best effort against the reliable
  subscription): diagnostics say why no image arrives (no publisher; the incompatible-QoS events and the
  policy); the node localizes once a compatible camera publishes;
* the camera killed (SIGKILL) and restarted: diagnostics report the timeout, poses resume;
* an exception in the worker for one frame: counted, the next frames are localized;
* `~/reload_map` with a corrupt map and with a map of another model: `success: false` with the reason, the
  old map keeps serving;
* the map folder deleted, and replaced by a rebuild (`overwrite`) while the node runs: the loaded map keeps
  serving (its big files are read through descriptors opened at load: deleted or renamed-over files stay
  readable), diagnostics say "deleted" / "replaced"; a reload takes the new map;
* the loaded map's `local.f16` truncated in place (what `cp` over a map does): frames fail with a MapError,
  counted, ERROR in diagnostics, the process lives (the file is read with pread, never memory-mapped, so no
  SIGBUS); setting `map_path` to a good map recovers.

Last, the live `build_map` node is killed with SIGKILL at seeded random points while `bag_player` plays a
bag to it: no half map ever loads under the final name, and a rerun completes and leaves only the map.
"""
from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from rostools import (
    NodeProcess,
    RosProbe,
    build_test_map,
    diagnostic_values,
    line_poses,
    save_tiny_model,
    synthetic_images,
    wait_until,
)

pytestmark = pytest.mark.ros

from bagtools import write_image_pose_bag  # noqa: E402
from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from geometry_msgs.msg import PoseWithCovarianceStamped  # noqa: E402
from hostile import flip_byte, truncate  # noqa: E402
from rcl_interfaces.srv import SetParameters  # noqa: E402
from rclpy.event_handler import PublisherEventCallbacks  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.qos import QoSProfile, ReliabilityPolicy  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402
from std_srvs.srv import Trigger  # noqa: E402

from r2former_core.errors import MapError  # noqa: E402
from r2former_core.mapdb import MapDatabase  # noqa: E402
from r2former_ros.conversions import rgb_to_image_msg, sec_to_stamp, stamp_to_ns  # noqa: E402

NODE = "fault_localizer"
TOPIC = "/faults/image"
FAULT_FRAME_ID = "inject-fault"
MAP_SIZE, MAP2_SIZE = 12, 5
OK, WARN, ERROR, STALE = 0, 1, 2, 3          # diagnostic_msgs/DiagnosticStatus levels
RELIABLE = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
BEST_EFFORT = QoSProfile(depth=10, reliability=ReliabilityPolicy.BEST_EFFORT)


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_model, tiny_config):
    from r2former_core.model import build_model
    root = tmp_path_factory.mktemp("node_faults")
    images = synthetic_images(MAP_SIZE, seed=31)
    model = save_tiny_model(tiny_model, root / "tiny.safetensors")
    pristine = build_test_map(tiny_model, images, line_poses(MAP_SIZE), root / "pristine")
    shutil.copytree(pristine, root / "live_map")
    corrupt = shutil.copytree(pristine, root / "corrupt")
    flip_byte(corrupt / "poses.npy", (corrupt / "poses.npy").stat().st_size - 9)
    other = build_test_map(build_model(tiny_config, seed=99), images, line_poses(MAP_SIZE), root / "other_model")
    stamps = list(100.0 + 0.5 * np.arange(MAP_SIZE))
    camera_bag = write_image_pose_bag(root / "camera_bag", images, stamps, image_topic=TOPIC)
    return dict(root=root, model=model, pristine=pristine, live=root / "live_map", corrupt=corrupt, other=other,
                images=images, camera_bag=camera_bag, tiny_model=tiny_model)


class Session:
    def __init__(self, assets: dict) -> None:
        self.assets = assets
        self.logs = assets["root"] / "logs"
        self.probe = RosProbe("faults_probe")
        self.poses = self.probe.subscribe(PoseWithCovarianceStamped, f"/{NODE}/pose")
        self.diagnostics = self.probe.subscribe(DiagnosticArray, "/diagnostics")
        env = dict(os.environ, R2FORMER_INJECT_FAULT_FRAME_ID=FAULT_FRAME_ID)
        self.node = NodeProcess("r2former_ros.localize_node", [
            "--ros-args", "-r", f"__node:={NODE}", "-r", f"image:={TOPIC}",
            "-p", f"map_path:={assets['live']}", "-p", f"model_path:={assets['model']}", "-p", "device:=cpu",
            "-p", "min_confidence:=0.0", "-p", "top_k:=3", "-p", "diagnostics_rate:=10.0", "-p", "matches_rate:=0.0",
            "-p", "tracking:=false",   # single frames: every good image gives a pose
            "-p", "qos_reliability:=reliable", "-p", "qos_depth:=10", "-p", "input_timeout_s:=1.0",
            "-p", "diagnostics_window:=2.0"], self.logs, env=env)
        self.pub = None
        self.stamp = 500.0

    def diag(self, kind: str = "localization", until=lambda d: True, timeout: float = 30.0) -> dict[str, str]:
        """The newest `<node>: <kind>` status that satisfies `until` (received after this call)."""
        n = len(self.diagnostics)
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            for array in self.diagnostics.snapshot()[n:]:
                values = diagnostic_values(array, kind, NODE)
                if values is not None:
                    last = values
                    if until(values):
                        return values
            n = max(n, len(self.diagnostics) - 1)
            time.sleep(0.05)
        raise AssertionError(f"no {kind} status satisfying the condition in {timeout} s; last: {last}\n"
                             f"{self.node.output()[-3000:]}")

    def camera(self) -> NodeProcess:
        return NodeProcess("r2former_ros.bag_player", [str(self.assets["camera_bag"]), "--loop", "--rate", "2",
                                                       "--qos-reliability", "reliable"], self.logs)

    def publisher(self):
        if self.pub is None:
            self.pub = self.probe.publisher(Image, TOPIC, RELIABLE)
            assert wait_until(lambda: self.pub.get_subscription_count() > 0, 30)
        return self.pub

    def send(self, i: int = 0, frame_id: str = "camera") -> int:
        self.stamp += 0.1
        msg = rgb_to_image_msg(self.assets["images"][i % MAP_SIZE])
        msg.header.stamp = sec_to_stamp(self.stamp)
        msg.header.frame_id = frame_id
        self.publisher().publish(msg)
        return stamp_to_ns(msg.header.stamp)

    def localized(self, stamp_ns: int, timeout: float = 30.0) -> bool:
        return wait_until(lambda: any(stamp_to_ns(p.header.stamp) == stamp_ns for p in self.poses.snapshot()[-30:]),
                          timeout)

    def reload(self) -> Trigger.Response:
        return self.probe.call(Trigger, f"/{NODE}/reload_map", Trigger.Request())

    def set_map(self, path: Path):
        req = SetParameters.Request(parameters=[Parameter("map_path", value=str(path)).to_parameter_msg()])
        return self.probe.call(SetParameters, f"/{NODE}/set_parameters", req).results[0]

    def close(self) -> None:
        self.node.stop()
        self.probe.close()


@pytest.fixture(scope="module")
def session(assets):
    s = Session(assets)
    try:
        yield s
    finally:
        s.close()


def test_node_started_before_the_camera_and_incompatible_qos_say_why_then_localize(session):
    s = session
    d = s.diag("input images", until=lambda d: d["_level"] == STALE, timeout=90)
    assert f"no publisher on {TOPIC}" in d["_message"], d
    print(f"\nno camera yet: STALE '{d['_message']}'")

    offered = []                  # the publisher's side of the event (a callback instead of rclpy's default log)
    # a best-effort camera; the node subscribes reliably
    wrong = s.probe.node.create_publisher(Image, TOPIC, BEST_EFFORT,
                                          event_callbacks=PublisherEventCallbacks(incompatible_qos=offered.append))
    n_poses = len(s.poses)
    stop = time.monotonic() + 60
    d = None
    while time.monotonic() < stop:
        msg = rgb_to_image_msg(s.assets["images"][0])
        msg.header.frame_id = "camera"
        wrong.publish(msg)
        d = s.diag("input images", timeout=5)
        if "compatible QoS" in d["_message"]:
            break
    assert d is not None and "none with a compatible QoS" in d["_message"] and "RELIABILITY" in d["_message"], d
    assert int(d["incompatible QoS events"]) >= 1 and d["matched publishers"] in ("0", "unknown"), d
    assert len(s.poses) == n_poses, "a best-effort publisher cannot deliver to a reliable subscription"
    assert offered, "the publisher is told too"
    assert "incompatible" in s.node.output()
    print(f"incompatible publisher: '{d['_message']}'")
    s.probe.node.destroy_publisher(wrong)

    camera = s.camera()
    try:
        assert s.poses.wait(n_poses + 3, 90), s.node.output()[-3000:] + camera.output()[-2000:]
        d = s.diag("input images", until=lambda d: d["_level"] == OK)
        assert int(d["matched publishers"]) >= 1, d
    finally:
        camera.stop()


def test_camera_killed_and_restarted(session):
    s = session
    camera = s.camera()
    try:
        n = len(s.poses)
        assert s.poses.wait(n + 2, 90), camera.output()[-2000:]
        camera.proc.kill()                       # SIGKILL: no goodbye on the graph
        camera.proc.wait(10)
        d = s.diag("input images", until=lambda d: d["_level"] == ERROR, timeout=30)
        assert "no image for" in d["_message"], d
        print(f"\ncamera killed: ERROR '{d['_message']}'")
    finally:
        camera.stop()
    camera = s.camera()
    try:
        n = len(s.poses)
        assert s.poses.wait(n + 3, 90), s.node.output()[-3000:]
        s.diag("input images", until=lambda d: d["_level"] == OK)
    finally:
        camera.stop()
    assert s.node.alive()


def test_exception_in_the_worker_for_one_frame_does_not_stop_it(session):
    s = session
    assert s.localized(s.send(1))
    before = int(s.diag()["errors"])
    bad = s.send(2, frame_id=FAULT_FRAME_ID)
    d = s.diag(until=lambda d: int(d["errors"]) == before + 1)
    assert d["last_error"].startswith("InjectedFault: fault injected"), d
    assert not s.localized(bad, timeout=0.5)             # its pose step raised: nothing published for it
    for i in range(3):
        assert s.localized(s.send(i)), "the frames after the failing one must be localized"
    assert int(s.diag()["errors"]) == before + 1
    assert "InjectedFault" in s.node.output() and s.node.alive()


def test_reload_with_corrupt_or_other_model_map_keeps_the_old_map(session):
    s, a = session, session.assets
    aside = a["root"] / "live_map.aside"
    os.rename(a["live"], aside)
    try:
        for source, needle in ((a["corrupt"], "corrupted"), (a["other"], "was built with model")):
            shutil.copytree(source, a["live"])
            res = s.reload()
            assert not res.success and needle in res.message and "keeping the loaded map" in res.message, \
                res.message
            print(f"\nreload {source.name}: success={res.success} '{res.message[:150]}'")
            assert s.localized(s.send(3)), "the old map keeps serving"
            d = s.diag(until=lambda d: d.get("map on disk") == "replaced")
            assert d["map_size"] == str(MAP_SIZE) and d["errors"] == s.diag()["errors"], d
            shutil.rmtree(a["live"])
    finally:
        os.rename(aside, a["live"])
    s.diag(until=lambda d: d.get("map on disk") == "as loaded")
    assert s.node.alive()


def test_map_folder_deleted_while_running_keeps_serving_and_says_so(session):
    s, a = session, session.assets
    errors = int(s.diag()["errors"])
    shutil.rmtree(a["live"])
    for i in range(4):                 # local features of 3 candidates read from the deleted files each time
        assert s.localized(s.send(i))
    d = s.diag(until=lambda d: d.get("map on disk") == "deleted")
    assert d["_level"] == WARN and "was deleted" in d["_message"] and int(d["errors"]) == errors, d
    print(f"\nmap deleted: {d['_message']}")
    res = s.reload()
    assert not res.success and "does not exist" in res.message, res.message
    assert s.localized(s.send(5)) and s.node.alive()


def test_map_replaced_by_a_rebuild_while_running_keeps_serving_until_reloaded(session):
    s, a = session, session.assets
    shutil.copytree(a["pristine"], a["live"])
    res = s.reload()
    assert res.success, res.message
    s.diag(until=lambda d: d.get("map on disk") == "as loaded")
    errors = int(s.diag()["errors"])
    # the operator rebuilds the map under the same name (`build-map --overwrite`)
    build_test_map(a["tiny_model"], a["images"][:MAP2_SIZE], line_poses(MAP2_SIZE, 2.0), a["live"], overwrite=True)
    for i in range(4):
        assert s.localized(s.send(i))
    d = s.diag(until=lambda d: d.get("map on disk") == "replaced")
    assert d["map_size"] == str(MAP_SIZE) and int(d["errors"]) == errors and "~/reload_map" in d["_message"], d
    res = s.reload()
    assert res.success, res.message
    d = s.diag(until=lambda d: d["map_size"] == str(MAP2_SIZE) and d.get("map on disk") == "as loaded")
    assert s.localized(s.send(1))


def test_map_truncated_in_place_is_an_error_not_a_crash(session):
    s, a = session, session.assets
    local = a["live"] / "local.f16"
    entry = local.stat().st_size // MAP2_SIZE
    errors = int(s.diag()["errors"])
    truncate(local, entry)             # in place, as `cp` over a map would: entries 1.. are gone
    for i in range(3):
        s.send(i)
        time.sleep(0.3)
    d = s.diag(until=lambda d: int(d["map_errors"]) > 0 and d["_level"] == ERROR)
    assert "failed reading the map" in d["_message"] and int(d["errors"]) > errors, d
    print(f"\nlocal.f16 truncated in place: ERROR '{d['_message'][:200]}'")
    assert s.node.alive()
    res = s.reload()
    assert not res.success and "truncated" in res.message, res.message
    fresh = shutil.copytree(a["pristine"], a["root"] / "fresh_map")
    assert s.set_map(fresh).successful
    assert s.localized(s.send(4))
    d = s.diag(until=lambda d: "failed reading the map" not in d["_message"] and d["map_size"] == str(MAP_SIZE))
    assert d.get("map on disk") == "as loaded", d
    assert s.node.alive() and "Traceback" not in s.node.output()


# ------------------------------------------------------------------------------------------------------------
# build_map --live killed while a bag is played to it

LIVE_KILLS = 20
LIVE_IMAGES = 40


@pytest.fixture(scope="module")
def live_inputs(tmp_path_factory, tiny_model):
    from r2former_core.data.poses import quat_from_yaw
    root = tmp_path_factory.mktemp("live_kills")
    rng = np.random.default_rng(7)
    import cv2
    images = [cv2.resize(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8), (128, 96), interpolation=cv2.INTER_CUBIC)
              for _ in range(LIVE_IMAGES)]
    stamps = 1000.0 + np.arange(LIVE_IMAGES) * 0.5
    poses = np.zeros((LIVE_IMAGES, 7))
    poses[:, 0] = np.arange(LIVE_IMAGES) * 3.0
    poses[:, 3:] = quat_from_yaw(np.zeros(LIVE_IMAGES))
    bag = write_image_pose_bag(root / "bag", images, list(stamps), poses, list(stamps), image_topic="/live/image",
                               pose_topic="/live/odom", storage="mcap")
    model = save_tiny_model(tiny_model, root / "tiny.safetensors")
    return {"root": root, "bag": bag, "model": str(model), "xs": poses[:, 0],
            "entry_bytes": tiny_model.cfg.local_tokens * tiny_model.cfg.local_values * 2}


def player_args(inputs: dict) -> list[str]:
    """The bag at 10x, reliable and transient_local, once the node's two subscriptions are matched. The player
    sees a match when its writer has discovered the reader; the reader may discover the writer seconds later on
    a busy machine (seen twice: 40 poses and no image arrived, with a volatile reader, which drops what was
    sent before it matched). A transient_local reader gets the writer's history (depth 100 >= 40) once
    matched, and the player waits until every message is acknowledged (--ack-timeout)."""
    return [str(inputs["bag"]), "--rate", "10", "--wait-for-subscribers", "30", "--qos-depth", "100",
            "--qos-durability", "transient_local", "--ack-timeout", "30"]


def _live_argv(inputs: dict, out: Path) -> list[str]:
    return ["--live", "--image-topic", "/live/image", "--pose-topic", "/live/odom", "--out", str(out),
            "--model", inputs["model"], "--device", "cpu", "--min-distance", "0", "--min-angle", "0", "--overwrite",
            "--ros-args", "-p", "qos_reliability:=reliable", "-p", "max_pending:=100", "-p", "qos_depth:=100",
            "-p", "qos_durability:=transient_local", "-p", "pose_wait:=10.0"]


def _check_loadable_is_complete(out: Path, xs: np.ndarray) -> int:
    db = MapDatabase.load(out, verify="full")
    try:
        assert len(db) > 0 and np.isin(db.poses[:, 0], xs).all()     # every entry is a pose of the bag
        return len(db)
    finally:
        db.close()


def test_live_build_map_killed_at_seeded_points_never_leaves_a_half_map(live_inputs, tmp_path):
    """Each run: a fresh build_map --live (forked from a process that has imported it, see test_faults), a
    fresh bag_player playing the bag at 10x (40 images in 2 s); killed with SIGKILL after a seeded fraction of
    the images became keyframes, or, for a third of the runs, after SIGINT made it commit, when a seeded file of
    the commit appears."""
    from test_faults import COMMIT_FILES, Zygote, alive, file_size, state_after_kill
    inputs = live_inputs
    out = tmp_path / "maps" / "m"
    out.parent.mkdir()
    logs = tmp_path / "logs"
    logs.mkdir()
    rng = np.random.default_rng(2024)
    points = [("entries", float(f)) for f in rng.uniform(0.05, 0.9, LIVE_KILLS - LIVE_KILLS // 3)]
    points += [("commit", str(f)) for f in rng.choice(COMMIT_FILES, LIVE_KILLS // 3)]
    points = [points[i] for i in rng.permutation(len(points))]
    zygote = Zygote()
    landed = []
    try:
        for i, (kind, where) in enumerate(points):
            if i % 2 == 0 and out.exists():
                shutil.rmtree(out)
            had_map = out.exists()
            t0 = time.monotonic()
            pid = zygote.start("build_map", _live_argv(inputs, out), logs / f"live{i}.log")
            player = NodeProcess("r2former_ros.bag_player", player_args(inputs), logs)
            try:
                deadline = time.monotonic() + 120
                interrupted = False
                while time.monotonic() < deadline and alive(pid):
                    tmp = list(out.parent.glob(f"{out.name}.tmp-{pid}-*"))
                    if kind == "entries":
                        if any(file_size(t / "local.f16") >= where * LIVE_IMAGES * inputs["entry_bytes"] > 0
                               for t in tmp):
                            break
                        if not player.alive():
                            break                      # the bag ended before that fraction: kill now
                    else:
                        if not interrupted and not player.alive():
                            os.kill(pid, signal.SIGINT)           # Ctrl-C: the node commits its map
                            interrupted = True
                        if any((t / where).exists() for t in tmp):
                            break
                    time.sleep(0.001)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                status = zygote.wait(pid)
            finally:
                player.stop()
            where_text = where if isinstance(where, str) else f"{where:.2f}"
            outcome = (f"killed {state_after_kill(out, pid, LIVE_IMAGES, inputs['entry_bytes'])}" if status == -9
                       else f"finished (exit {status})")
            landed.append(f"{kind} {where_text}: {outcome} ({time.monotonic() - t0:.1f} s)")
            assert status in (-signal.SIGKILL, 0), (logs / f"live{i}.log").read_text()[-3000:]
            if out.exists():                  # never a half map: absent, or complete and verified
                _check_loadable_is_complete(out, inputs["xs"])
            elif had_map:
                olds = sorted(out.parent.glob(f"{out.name}.old-*"))
                assert olds, "the map vanished without an .old-* copy"
                _check_loadable_is_complete(olds[0], inputs["xs"])
            else:
                with pytest.raises(MapError, match="does not exist"):
                    MapDatabase.load(out)
        leftovers = sorted(p.name for p in out.parent.iterdir() if p.name != "m")
        # a rerun, played to the end and interrupted (Ctrl-C), completes and leaves only the map. After 20
        # SIGKILLed participants Fast DDS (3.2.3) sometimes never discovers one of the new builder's two
        # readers (CI, twice: the player saw no /live/image subscriber in 60 s, 40 poses arrived, no image).
        # That is the middleware's state after the kills, not the map's: a builder whose reader was never
        # discovered is stopped (it writes nothing) and started again, at most three times.
        for attempt in range(3):
            pid = zygote.start("build_map", _live_argv(inputs, out), logs / f"rerun{attempt}.log")
            player = NodeProcess("r2former_ros.bag_player", player_args(inputs), logs)
            try:
                assert player.wait(120) == 0, player.output()[-2000:]
                undiscovered = "too few subscribers" in player.output()
                time.sleep(1.5)               # the last image waits for its pose (pose_wait) and is extracted
                os.kill(pid, signal.SIGINT)
                status = zygote.wait(pid)
            finally:
                player.stop()
            if not undiscovered:
                break
            assert status in (0, 1), (logs / f"rerun{attempt}.log").read_text()[-3000:]
        assert status == 0, (logs / f"rerun{attempt}.log").read_text()[-3000:]
        count = _check_loadable_is_complete(out, inputs["xs"])
        assert sorted(p.name for p in out.parent.iterdir()) == ["m"], "the rerun removes the dead writers' leftovers"
    finally:
        zygote.close()
    mid = sum("writing entries" in x or "in the commit" in x or "renames" in x for x in landed)
    print(f"\nbuild_map --live: {len(landed)} kills, {mid} while the map was being written; leftovers before the "
          f"rerun: {len(leftovers)}; rerun: {count} keyframes\n  " + "\n  ".join(landed))
    assert mid >= len(landed) // 2, landed
