"""Localization state with hysteresis (pure Python, no ROS).

    not_localized --(localized_after consecutive accepted)--> localized
    localized     --(lost_after consecutive rejected)------> lost
    lost          --(localized_after consecutive accepted)--> localized

A single accepted or rejected result never flips the state on its own unless the thresholds are 1.

With the tracker (`r2former_core.tracking`), `follow` replaces `update`: the filter has its own hysteresis
(a place must hold `min_mass` of the belief to be published, `lost_frames` frames below `track_mass` to be
lost), so the state is the filter's:

    filter tracking and the pose published        -> localized
    filter lost                                   -> lost
    filter global (start, reset, time jump, gap)  -> not_localized, or lost when it was localized before
    otherwise (tracking, place not sure enough)   -> unchanged
"""
from __future__ import annotations

from dataclasses import dataclass

from r2former_core.errors import ConfigError

NOT_LOCALIZED = "not_localized"
LOCALIZED = "localized"
LOST = "lost"


@dataclass(frozen=True)
class Transition:
    previous: str
    current: str


class LocalizationStateMachine:
    def __init__(self, localized_after: int = 2, lost_after: int = 5):
        if localized_after < 1 or lost_after < 1:
            raise ConfigError(f"localized_after ({localized_after}) and lost_after ({lost_after}) must be >= 1")
        self.localized_after = localized_after
        self.lost_after = lost_after
        self.state = NOT_LOCALIZED
        self.accepted_streak = 0
        self.rejected_streak = 0

    def update(self, accepted: bool) -> Transition | None:
        """Feed one result; returns the transition when the state changed, else None."""
        if accepted:
            self.accepted_streak += 1
            self.rejected_streak = 0
        else:
            self.rejected_streak += 1
            self.accepted_streak = 0
        previous = self.state
        if self.state != LOCALIZED and self.accepted_streak >= self.localized_after:
            self.state = LOCALIZED
        elif self.state == LOCALIZED and self.rejected_streak >= self.lost_after:
            self.state = LOST
        return Transition(previous, self.state) if self.state != previous else None

    def follow(self, filter_state: str, accepted: bool) -> Transition | None:
        """Feed one tracker result (its state global / tracking / lost and whether its pose was published);
        returns the transition when the state changed, else None."""
        previous = self.state
        if accepted:
            self.accepted_streak, self.rejected_streak = self.accepted_streak + 1, 0
        else:
            self.accepted_streak, self.rejected_streak = 0, self.rejected_streak + 1
        if filter_state == "tracking" and accepted:
            self.state = LOCALIZED
        elif filter_state == "lost":
            self.state = LOST
        elif filter_state == "global":
            self.state = NOT_LOCALIZED if previous == NOT_LOCALIZED else LOST
        return Transition(previous, self.state) if self.state != previous else None
