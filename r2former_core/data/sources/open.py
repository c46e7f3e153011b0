"""`open_source`: the source described by command-line style arguments."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from ...errors import DataError
from .bag import IMAGE_MSG_TYPES, POSE_MSG_TYPES, TF_MSG_TYPE, TF_TOPIC, format_topics, list_topics
from .base import Source
from .folder import ImageFolderSource
from .rosbag import RosbagSource
from .vg import VGFolderSource, is_vg_folder

log = logging.getLogger(__name__)


def only_topic_of(bag: str | Path, types: tuple[str, ...], role: str, option: str) -> str:
    """The one topic of the bag with a type in `types`; DataError listing the topics when there is not one."""
    topics = list_topics(bag)
    candidates = sorted(name for name, msgtype in topics.items() if msgtype in types)
    if len(candidates) == 1:
        log.info("using %s topic %s (the only one in the bag)", role, candidates[0])
        return candidates[0]
    found = f"{len(candidates)} candidates ({', '.join(candidates)})" if candidates else "none"
    tf_hint = ""
    if role == "pose" and not candidates and TF_MSG_TYPE in topics.values():
        tf_hint = f"; for poses from TF give --pose-topic {TF_TOPIC} --tf-frames PARENT:CHILD"
    raise DataError(f"pass {option}: bag {bag} has {found} of type {' / '.join(types)}; "
                    f"{format_topics(topics)}{tf_hint}")


def open_source(images: str | Path | None = None, poses: str | Path | None = None, bag: str | Path | None = None,
                image_topic: str | None = None, pose_topic: str | None = None, tolerance: float = 0.05,
                max_gap: float = 1.0, require_poses: bool = True, skip_unreadable: bool = False,
                tf_frames: str | Sequence[str] | None = None,
                pose_frames: str | Sequence[str | None] | None = None, camera_convention: str = "auto") -> Source:
    """The source described by command-line style arguments.

    * `images` (+ optional `poses`): a VG-benchmark folder when the names say so and no pose file is
      given, else an `ImageFolderSource`;
    * `bag` (+ `image_topic`, `pose_topic`): a `RosbagSource`. When a topic is omitted and the bag has
      exactly one topic of a suitable type, that one is used; the pose topic is looked up only
      when `require_poses` is True (without poses, queries get NaN poses). With `tf_frames`
      ("PARENT:CHILD") the poses come from TF (pose topic default `/tf`, plus `/tf_static`).

    Every source reports the frames of its poses as `frames`: from the messages or the TF frames for a
    bag, completed by `pose_frames` ("PARENT:CHILD", or a pair with None for a frame not given); for a
    folder `pose_frames`, default map:camera. `camera_convention` (auto / body / optical) says when poses
    are of an optical camera frame and are turned into the body convention (`r2former_core.frames`).
    """
    if images is not None and bag is not None:
        raise DataError("give either an image folder or a bag, not both")
    if images is None and bag is None:
        raise DataError("give an image folder (with a pose file) or a bag (with an image topic)")
    if bag is not None:
        if poses is not None:
            raise DataError("a pose file goes with an image folder; for a bag, give the pose topic instead")
        if image_topic is None:
            image_topic = only_topic_of(bag, IMAGE_MSG_TYPES, "image", "the image topic")
        if tf_frames is not None and pose_topic is None:
            pose_topic = TF_TOPIC
        if pose_topic is None and require_poses:
            pose_topic = only_topic_of(bag, POSE_MSG_TYPES, "pose", "the pose topic")
        return RosbagSource(bag, image_topic, pose_topic, tolerance=tolerance, max_gap=max_gap,
                            require_poses=require_poses, tf_frames=tf_frames, pose_frames=pose_frames,
                            camera_convention=camera_convention)
    assert images is not None
    if tf_frames is not None:
        raise DataError("TF frames go with a bag (poses from its /tf); for an image folder, give a pose file")
    if image_topic is not None or pose_topic is not None:
        raise DataError("image and pose topics go with a bag; for an image folder, give a pose file instead")
    if poses is None and is_vg_folder(images):
        return VGFolderSource(images, skip_unreadable=skip_unreadable, pose_frames=pose_frames,
                              camera_convention=camera_convention)
    return ImageFolderSource(images, poses, tolerance=tolerance, require_poses=require_poses,
                             skip_unreadable=skip_unreadable, max_gap=max_gap, pose_frames=pose_frames,
                             camera_convention=camera_convention)
