"""`RosbagSource`: images of one topic of a rosbag2, posed from a pose topic or from TF."""
from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from ...errors import ImageDecodeError
from ...frames import PoseFrames, check_convention, given_frames, to_body_convention
from ..poses import nan_poses
from .bag import IMAGE_MSG_TYPES, MESSAGE_ERRORS, TF_TOPIC, connections, decode_image_msg, open_bag
from .bag_scan import (
    BagRecord,
    MessageCounter,
    ScanCounts,
    ScanRequest,
    assign_poses,
    read_bag,
    scan_frames,
    unique_records,
)
from .base import PosedImage
from .tf import TransformTree, parse_tf_frames

log = logging.getLogger(__name__)


class RosbagSource:
    """Images of `image_topic` in a rosbag2 (sqlite3 or mcap), posed from `pose_topic`.

    * image types: sensor_msgs/msg/Image (any encoding `decode_raw` supports) and
      sensor_msgs/msg/CompressedImage (JPEG/PNG);
    * pose types: nav_msgs/msg/Odometry, geometry_msgs/msg/PoseStamped,
      geometry_msgs/msg/PoseWithCovarianceStamped; the pose is used as is (no camera extrinsics),
      its frames are the messages' (`header.frame_id`, Odometry's `child_frame_id`), completed by
      `pose_frames` (see `frames_from_messages`);
    * or TF: a `tf2_msgs/msg/TFMessage` pose topic (normally `/tf`, the default when `tf_frames`
      is given without a pose topic) plus `/tf_static` when the bag has it, and
      `tf_frames` = "PARENT:CHILD" (or a pair): the pose of CHILD in PARENT, chained over the frame
      tree (`TransformTree`), each dynamic transform interpolated at the image stamp;
    * `frames` (`PoseFrames`) names the frame pair of the poses; poses of an optical camera frame are
      turned into the body convention (`camera_convention`, see `r2former_core.frames`);
    * stamps are header stamps, or the bag time when a header stamp is zero;
    * the pose of an image is interpolated at its stamp (`interpolate_poses` with `tolerance` and
      `max_gap`); images without a pose are skipped and counted (kept with a NaN pose when
      `require_poses` is False); no posed image at all is an error;
    * without `pose_topic` every image has a NaN pose (localization queries);
    * images with a repeated stamp are skipped (counted), so record names `f"{stamp:.6f}"` are unique.

    Construction reads the bag once without decoding images (stamps and poses, see `bag_scan`);
    iteration reads it again and decodes the images one by one. Undecodable image messages are
    logged and skipped (`skipped_undecodable` counts those of the last iteration), so an iteration
    can yield fewer than `len()` records.
    """

    def __init__(self, bag_path: str | Path, image_topic: str, pose_topic: str | None = None,
                 tolerance: float = 0.05, max_gap: float = 1.0, require_poses: bool = True,
                 tf_frames: str | Sequence[str] | None = None,
                 pose_frames: str | Sequence[str | None] | None = None, camera_convention: str = "auto") -> None:
        self.bag_path = Path(bag_path)
        self.image_topic = image_topic
        self.tf_frames = parse_tf_frames(tf_frames) if tf_frames is not None else None
        if self.tf_frames is not None and pose_topic is None:
            pose_topic = TF_TOPIC
        self.pose_topic = pose_topic
        self.tolerance = tolerance
        self.max_gap = max_gap
        self.require_poses = require_poses
        self.skipped_undecodable = 0
        given = given_frames(pose_frames)
        check_convention(camera_convention)

        request = ScanRequest(self.bag_path, image_topic, pose_topic, self.tf_frames, tolerance, max_gap)
        scan = read_bag(request)
        poses, valid = assign_poses(scan, request, require_poses)
        frames = scan_frames(scan, request, given)
        poses, optical = to_body_convention(poses, frames.child, camera_convention)
        self.frames = PoseFrames(frames.parent, frames.child, optical)
        self._records, duplicates = unique_records(scan.image_keys, scan.stamps, poses, valid, require_poses)
        self.counts: ScanCounts = scan.counts
        self.counts.duplicate_stamps = duplicates
        if duplicates:
            log.warning("%s: %d image(s) with an already seen stamp skipped", image_topic, duplicates)
        self.tf_tree: TransformTree | None = scan.tf_tree  # set when the poses come from TF

        pose_part = f" posed by {pose_topic} ({scan.pose_type})" if pose_topic else " (no poses)"
        if self.tf_tree is not None and self.tf_frames is not None:
            pose_part += f" {self.tf_frames[0]} -> {self.tf_frames[1]}"
        self.description = (f"rosbag {self.bag_path}: {image_topic} ({scan.image_type}){pose_part}, "
                            f"{len(self)} images")
        log.info("opened %s", self.description)

    def __len__(self) -> int:
        return len(self._records)

    @property
    def names(self) -> list[str]:
        return [f"{r.stamp:.6f}" for r in self._records]

    def poses(self) -> tuple[np.ndarray, np.ndarray]:
        stamps = np.asarray([r.stamp for r in self._records], dtype=np.float64)
        poses = np.stack([r.pose for r in self._records]) if self._records else nan_poses(0)
        return stamps, poses

    def __iter__(self) -> Iterator[PosedImage]:
        self.skipped_undecodable = 0
        wanted: dict[tuple[int, int, int], BagRecord] = {r.key: r for r in self._records}
        remaining = len(wanted)
        numbering = MessageCounter()
        with open_bag(self.bag_path) as reader:
            conns = connections(reader, self.image_topic, IMAGE_MSG_TYPES, "image", self.bag_path)
            for conn, t_ns, raw in reader.messages(connections=conns):
                if remaining == 0:
                    break
                record = wanted.get(numbering.key(conn.id, t_ns))
                if record is None:
                    continue
                remaining -= 1
                name = f"{record.stamp:.6f}"
                try:
                    image = decode_image_msg(reader.deserialize(raw, conn.msgtype), conn.msgtype)
                except (ImageDecodeError, *MESSAGE_ERRORS) as exc:
                    self.skipped_undecodable += 1
                    log.warning("%s: skipping undecodable image %s: %s", self.image_topic, name, exc)
                    continue
                yield PosedImage(name, record.stamp, record.pose.copy(), image)
        if self.skipped_undecodable:
            log.warning("%s: skipped %d undecodable image(s) of %d", self.image_topic,
                        self.skipped_undecodable, len(self))
