"""What every source yields (`PosedImage`) and offers (`Source`)."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ...frames import PoseFrames

_EXAMPLES = 3  # how many example names a log message or error lists


@dataclass
class PosedImage:
    """One image with its pose; `image` is HxWx3 uint8 RGB, None until loaded."""
    name: str
    stamp: float
    pose: np.ndarray  # (7,) x y z qx qy qz qw; NaN when unknown
    image: np.ndarray | None = None

    @property
    def has_pose(self) -> bool:
        return bool(np.all(np.isfinite(self.pose)))


@runtime_checkable
class Source(Protocol):
    """What map building and localization read from."""
    description: str
    frames: PoseFrames  # the frame pair the poses describe (pose of frames.child in frames.parent)

    def __len__(self) -> int:
        """Number of records (a source that skips undecodable images may yield fewer)."""
        ...

    @property
    def names(self) -> list[str]:
        """Record names (unique), in iteration order, without loading images."""
        ...

    def __iter__(self) -> Iterator[PosedImage]:
        """Records in source order, each image loaded when its record is reached."""
        ...

    def poses(self) -> tuple[np.ndarray, np.ndarray]:
        """(stamps (N,), poses (N, 7)) of all records, in iteration order, without loading images."""
        ...


class ListSource:
    """Records already in memory (rendered, or decoded elsewhere) as a `Source`."""

    def __init__(self, records: Sequence[PosedImage], frames: PoseFrames, description: str = "") -> None:
        self.records = list(records)
        self.frames = frames
        self.description = description or f"{len(self.records)} images in memory"

    def __len__(self) -> int:
        return len(self.records)

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.records]

    def __iter__(self) -> Iterator[PosedImage]:
        return iter(self.records)

    def poses(self) -> tuple[np.ndarray, np.ndarray]:
        if not self.records:
            return np.zeros(0), np.zeros((0, 7))
        return np.array([r.stamp for r in self.records]), np.stack([r.pose for r in self.records])


def examples(items: Sequence[Any]) -> str:
    """The first few items, comma-separated, with '...' when there are more (for messages)."""
    shown = ", ".join(str(x) for x in items[:_EXAMPLES])
    return shown + (", ..." if len(items) > _EXAMPLES else "")
