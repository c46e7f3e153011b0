"""A one-slot "newest frame wins" buffer between a subscription callback and a worker thread.

The callback only stores the newest message (`put`, O(1), never blocks on the worker); the worker
takes it (`take`). A message overwritten before the worker took it counts as dropped, so at any
time `received == taken + dropped + pending` (pending is 0 or 1). No queue can grow.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Frame(Generic[T]):
    item: T
    received_at: float  # time.monotonic() when put


@dataclass(frozen=True)
class SlotCounts:
    received: int
    taken: int
    dropped: int
    pending: int


class LatestFrameSlot(Generic[T]):
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._frame: Frame[T] | None = None
        self._closed = False
        self._received = 0
        self._taken = 0
        self._dropped = 0

    def put(self, item: T) -> bool:
        """Store `item` as the newest frame; returns True when an unprocessed frame was dropped."""
        with self._cond:
            self._received += 1
            dropped = self._frame is not None
            if dropped:
                self._dropped += 1
            self._frame = Frame(item, time.monotonic())
            self._cond.notify()
            return dropped

    def take(self, timeout: float | None = None) -> Frame[T] | None:
        """Wait for a frame and remove it; None on timeout or after `close()`."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._frame is not None or self._closed, timeout):
                return None
            if self._closed:
                return None
            frame, self._frame = self._frame, None
            self._taken += 1
            return frame

    def close(self) -> None:
        """Wake the worker and make every later `take` return None."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    def counts(self) -> SlotCounts:
        with self._cond:
            return SlotCounts(self._received, self._taken, self._dropped, int(self._frame is not None))

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        c: Any = self.counts()
        return f"LatestFrameSlot(received={c.received}, taken={c.taken}, dropped={c.dropped}, pending={c.pending})"
