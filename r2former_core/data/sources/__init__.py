"""Sources of posed images for map building and localization.

Every source yields `PosedImage` records one by one, loading each image only when it is reached
(maps are built from thousands of images), and can list all stamps and poses without loading any
image (`poses()`), so callers can select keyframes or check coverage first.

* `ImageFolderSource` (`folder`): a folder of PNG/JPEG files plus an optional TUM or CSV pose file;
* `VGFolderSource` (`vg`): a folder of the VG benchmark layout (poses encoded in the file names);
* `RosbagSource` (`rosbag`, reading in `bag_scan`, bag access in `bag`): a rosbag2 (sqlite3 or
  mcap) with an image topic and an optional pose topic (a pose message topic, or TF: `/tf` +
  `/tf_static` looked up between two frames, see `TransformTree` in `tf`);
* `ListSource` (`base`): records already in memory (rendered or decoded elsewhere);
* `open_source(...)` (`open`): picks one of them from command-line style arguments.

A pose of NaNs means "unknown" (localization queries without ground truth).
"""
from ...frames import PoseFrames, clean_frame_id
from .bag import IMAGE_MSG_TYPES, POSE_MSG_TYPES, TF_MSG_TYPE, TF_STATIC_TOPIC, TF_TOPIC, list_topics
from .base import ListSource, PosedImage, Source
from .files import IMAGE_EXTENSIONS, list_image_files, parse_stamp_stem, read_image_file
from .folder import CSV_SUFFIXES, TUM_SUFFIXES, ImageFolderSource
from .open import open_source
from .rosbag import RosbagSource
from .tf import TransformTree, parse_tf_frames
from .vg import VGFolderSource, is_vg_folder, parse_vg_name

__all__ = ["CSV_SUFFIXES", "IMAGE_EXTENSIONS", "IMAGE_MSG_TYPES", "ListSource", "POSE_MSG_TYPES", "TF_MSG_TYPE",
           "TF_STATIC_TOPIC", "TF_TOPIC", "TUM_SUFFIXES", "ImageFolderSource", "PosedImage", "PoseFrames",
           "RosbagSource", "Source", "TransformTree", "VGFolderSource", "clean_frame_id", "is_vg_folder",
           "list_image_files", "list_topics", "open_source", "parse_stamp_stem", "parse_tf_frames", "parse_vg_name",
           "read_image_file"]
