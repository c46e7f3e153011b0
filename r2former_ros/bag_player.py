"""`bag_player`: publish a rosbag2's topics with rclpy (no `ros2 bag` needed; reads with `rosbags`).

    bag_player BAG [--topics /camera/image_raw /odom] [--rate 2.0] [--loop] [--start-delay 1.0]
               [--wait-for-subscribers 5 [--subscribers /camera/image_raw=2]]
               [--qos-reliability reliable|best_effort] [--qos-depth 10]
               [--qos-durability volatile|transient_local] [--ack-timeout 10] [--clock]

Messages keep their recorded bytes, so header stamps are the original ones; they are sent at the
recorded pace (bag receive time) divided by `--rate`. Message types are taken from the bag and
resolved to the installed Python message classes by name (`sensor_msgs/msg/Image` ->
`sensor_msgs.msg.Image`); the first message of each topic is deserialized as a check, then the raw
CDR bytes are published as recorded.

Large images: the default QoS is reliable, because large best-effort samples are lost between
processes with Fast DDS' default UDP transport. To publish them best-effort (what camera drivers
do), give this process a Fast DDS profile with a big shared-memory segment:

    FASTDDS_DEFAULT_PROFILES_FILE=config/fastdds_shm.xml bag_player BAG --qos-reliability best_effort

Nothing lost to late discovery: `--wait-for-subscribers` starts once this process sees the subscribers,
but a subscriber may see this publisher later (DDS discovery, seconds on a busy machine), and a volatile
subscriber drops what was sent before. With `--qos-durability transient_local` (and a transient_local,
reliable subscriber, e.g. build_map's `qos_durability`) the publisher's history (`--qos-depth`) reaches
it once matched, and the player stays until every reliable subscriber acknowledged (`--ack-timeout`).
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import rclpy
from rclpy.duration import Duration
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.publisher import Publisher
from rclpy.serialization import deserialize_message
from rclpy.utilities import remove_ros_args

from .qos import DURABILITY_CHOICES, RELIABILITY_CHOICES, stream_qos

NODE_NAME = "r2former_bag_player"


class BagPlayerError(RuntimeError):
    """A bag or option that cannot be played; the message says why."""


def message_class(msgtype: str) -> type:
    """`pkg/msg/Name` (or `pkg/Name`) -> the installed rclpy message class `pkg.msg.Name`."""
    parts = msgtype.split("/")
    if len(parts) == 2:
        parts = [parts[0], "msg", parts[1]]
    if len(parts) != 3:
        raise BagPlayerError(f"cannot interpret message type {msgtype!r}")
    pkg, kind, name = parts
    try:
        return getattr(importlib.import_module(f"{pkg}.{kind}"), name)
    except (ImportError, AttributeError):
        raise BagPlayerError(f"message type {msgtype} is not installed (no Python module {pkg}.{kind} with "
                             f"{name}); install the ROS package {pkg}") from None


@dataclass
class TopicPlayback:
    topic: str
    msgtype: str
    msg_class: type
    publisher: Publisher
    checked: bool = False
    published: int = 0


def open_reader(bag: str | Path) -> Any:
    from rosbags.highlevel import AnyReader
    from rosbags.typesys import Stores, get_typestore
    path = Path(bag)
    if not path.exists():
        raise BagPlayerError(f"bag {path} does not exist")
    if path.is_file() and (path.parent / "metadata.yaml").is_file():
        path = path.parent
    reader = AnyReader([path], default_typestore=get_typestore(Stores.ROS2_KILTED))
    try:
        reader.open()
    except Exception as exc:  # noqa: BLE001 - rosbags raises several unrelated types
        raise BagPlayerError(f"cannot read bag {path}: {exc}") from exc
    if not reader.is2:
        reader.close()
        raise BagPlayerError(f"{path} is a ROS 1 bag; convert it first (`rosbags-convert --src {path} --dst out`)")
    return reader


class BagPlayer(Node):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(NODE_NAME)
        self.args = args
        self.reader = open_reader(args.bag)
        available = {name: info.msgtype for name, info in self.reader.topics.items()}
        wanted = args.topics or sorted(available)
        missing = [t for t in wanted if t not in available]
        if missing:
            raise BagPlayerError(f"topics {', '.join(missing)} are not in the bag; it has: "
                                 + ", ".join(f"{n} ({t})" for n, t in sorted(available.items())))
        qos = stream_qos(args.qos_reliability, args.qos_depth, args.qos_durability)
        self.topics: dict[str, TopicPlayback] = {}
        for name in wanted:
            try:
                cls = message_class(available[name])
            except BagPlayerError as exc:
                if args.topics:
                    raise
                self.get_logger().warning(f"skipping {name}: {exc}")
                continue
            self.topics[name] = TopicPlayback(name, available[name], cls, self.create_publisher(cls, name, qos))
        if not self.topics:
            raise BagPlayerError("no playable topics in the bag")
        self.connections = [c for c in self.reader.connections if c.topic in self.topics]
        self.clock_pub = None
        if args.clock:
            from rosgraph_msgs.msg import Clock
            self.clock_pub = self.create_publisher(Clock, "/clock", 10)
        self.get_logger().info(
            f"playing {args.bag}: " + ", ".join(f"{t.topic} ({t.msgtype})" for t in self.topics.values())
            + f" at rate {args.rate:g}, qos {args.qos_reliability}/{args.qos_depth}/{args.qos_durability}")

    def _sleep_until(self, deadline: float) -> bool:
        while rclpy.ok(context=self.context):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return True
            time.sleep(min(remaining, 0.05))
        return False

    def play_once(self) -> int:
        """Publish every selected message once at the recorded pace; returns the number published."""
        count = 0
        start_wall: float | None = None
        start_bag = 0
        for conn, t_ns, raw in self.reader.messages(connections=self.connections):
            if start_wall is None:
                start_wall, start_bag = time.monotonic(), t_ns
            if not self._sleep_until(start_wall + (t_ns - start_bag) * 1e-9 / self.args.rate):
                break
            playback = self.topics[conn.topic]
            data = bytes(raw)
            if not playback.checked:
                try:
                    deserialize_message(data, playback.msg_class)
                except Exception as exc:  # noqa: BLE001 - the serializer raises plain exceptions
                    raise BagPlayerError(f"{conn.topic}: recorded {playback.msgtype} does not match the installed "
                                         f"definition ({exc})") from exc
                playback.checked = True
            if self.clock_pub is not None:
                from rosgraph_msgs.msg import Clock
                clock = Clock()
                clock.clock.sec, clock.clock.nanosec = divmod(int(t_ns), 1_000_000_000)
                self.clock_pub.publish(clock)
            playback.publisher.publish(data)
            playback.published += 1
            count += 1
        return count

    def wait_for_subscribers(self, timeout: float, expected: dict[str, int] | None = None) -> bool:
        """Wait until every publisher has a subscriber, or the number `expected` names for its topic (at most
        `timeout` s); False on timeout. Counting matters with best-effort topics: a message sent before a
        subscriber is matched is lost for it, so a player that starts when the first of two subscribers
        appears can feed one and not the other."""
        expected = expected or {}

        def missing() -> list[str]:
            return [f"{t.topic} ({t.publisher.get_subscription_count()} of {expected.get(t.topic, 1)})"
                    for t in self.topics.values()
                    if t.publisher.get_subscription_count() < expected.get(t.topic, 1)]

        deadline = time.monotonic() + timeout
        while rclpy.ok(context=self.context) and time.monotonic() < deadline:
            if not missing():
                return True
            time.sleep(0.02)
        lacking = missing()
        if lacking:
            self.get_logger().warning(f"too few subscribers after {timeout:g} s on {', '.join(lacking)}; "
                                      "playing anyway")
        return not lacking

    def play(self) -> None:
        if self.args.wait_for_subscribers > 0:
            self.wait_for_subscribers(self.args.wait_for_subscribers, dict(self.args.subscribers))
        if self.args.start_delay > 0:
            self._sleep_until(time.monotonic() + self.args.start_delay)
        loops = 0
        while rclpy.ok(context=self.context):
            count = self.play_once()
            loops += 1
            self.get_logger().info(f"pass {loops}: published {count} messages")
            if not self.args.loop or count == 0:
                break
        if rclpy.ok(context=self.context) and self.args.qos_reliability == "reliable" and self.args.ack_timeout > 0:
            self.wait_for_acks(self.args.ack_timeout)
        if rclpy.ok(context=self.context) and self.args.linger > 0:
            self._sleep_until(time.monotonic() + self.args.linger)

    def wait_for_acks(self, timeout: float) -> bool:
        """Wait up to `timeout` s in all until every matched subscriber acknowledged every message (reliable
        QoS); False, with a warning naming the topics, on timeout."""
        deadline = time.monotonic() + timeout
        waiting = list(self.topics.values())
        while waiting and rclpy.ok(context=self.context):    # short waits: Ctrl-C stays responsive
            slice_ns = int(min(0.1, max(0.0, deadline - time.monotonic())) * 1e9)
            waiting = [t for t in waiting if not t.publisher.wait_for_all_acked(Duration(nanoseconds=slice_ns))]
            if time.monotonic() >= deadline:
                break
        late = [t.topic for t in waiting]
        if late:
            self.get_logger().warning(f"not every subscriber acknowledged every message within {timeout:g} s on "
                                      f"{', '.join(late)}")
        return not late

    def close(self) -> None:
        self.reader.close()


def topic_count(text: str) -> tuple[str, int]:
    """TOPIC=N for --subscribers."""
    topic, sep, count = text.rpartition("=")
    if not sep or not topic or not count.isdigit() or int(count) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected TOPIC=N with N >= 1, e.g. /camera/image_raw=2")
    return topic, int(count)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bag_player", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Large best-effort images need a Fast DDS shared-memory profile: "
                                       "FASTDDS_DEFAULT_PROFILES_FILE=config/fastdds_shm.xml")
    p.add_argument("bag", help="rosbag2 folder (sqlite3 or mcap), or a file inside it")
    p.add_argument("--topics", nargs="+", metavar="TOPIC", help="publish only these topics (default: all)")
    p.add_argument("--rate", type=float, default=1.0, help="playback speed factor (default 1.0 = recorded pace)")
    p.add_argument("--loop", action="store_true", help="start again at the end")
    p.add_argument("--start-delay", type=float, default=0.0, metavar="SEC",
                   help="wait before the first message, e.g. for subscribers to be discovered (default 0)")
    p.add_argument("--wait-for-subscribers", type=float, default=0.0, metavar="SEC",
                   help="before playing, wait up to SEC seconds until every topic has a subscriber (default 0)")
    p.add_argument("--subscribers", action="append", type=topic_count, default=[], metavar="TOPIC=N",
                   help="with --wait-for-subscribers: wait for N subscribers on TOPIC instead of one (e.g. the "
                        "localizer and an evaluator on the camera topic: /camera/image_raw=2); repeatable")
    p.add_argument("--qos-reliability", choices=RELIABILITY_CHOICES, default="reliable",
                   help="reliable (default; large images arrive without a shared-memory profile) or best_effort")
    p.add_argument("--qos-depth", type=int, default=10,
                   help="publisher history depth (default 10); with transient_local, what a late subscriber gets")
    p.add_argument("--qos-durability", choices=DURABILITY_CHOICES, default="volatile",
                   help="volatile (default; matches every subscriber) or transient_local (a transient_local "
                        "subscriber that discovers this publisher late still gets the history)")
    p.add_argument("--ack-timeout", type=float, default=10.0, metavar="SEC",
                   help="with reliable QoS: after the last message, wait up to SEC s until every subscriber "
                        "acknowledged every message (default 10; 0 = do not wait)")
    p.add_argument("--clock", action="store_true", help="also publish /clock with the bag time")
    p.add_argument("--linger", type=float, default=0.5, metavar="SEC",
                   help="then wait SEC s more before exiting (default 0.5; best-effort subscribers get the last "
                        "messages)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv if argv is None else argv
    args = build_parser().parse_args(remove_ros_args(argv)[1:])
    if args.rate <= 0:
        print("bag_player: error: --rate must be > 0", file=sys.stderr)
        return 2
    if min(args.ack_timeout, args.linger, args.start_delay, args.wait_for_subscribers) < 0 or args.qos_depth < 1:
        print("bag_player: error: --ack-timeout, --linger, --start-delay and --wait-for-subscribers must be >= 0, "
              "--qos-depth >= 1", file=sys.stderr)
        return 2
    rclpy.init(args=argv)
    player: BagPlayer | None = None
    try:
        player = BagPlayer(args)
        player.play()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except BagPlayerError as exc:
        print(f"bag_player: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if player is not None:
            player.close()
            player.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
