"""Slow down a device whose requests keep being refused.

A compromised agent host can send sign requests as fast as it likes.  Each
one shows a prompt, so it cannot sign without the person's consent, but a
stream of prompts invites a tired "yes".  After ``limit`` refusals in a row
(a denial or an unanswered prompt), the device's requests are refused
without a prompt for a pause that doubles with each further refusal.  One
approval ends the streak.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

DEFAULT_REFUSAL_LIMIT = 5
DEFAULT_REFUSAL_PAUSE = 30.0
# The pause stops doubling here, so a device is never locked out for good:
# a person who walks away from a flood comes back to a working signer.
MAX_REFUSAL_PAUSE = 600.0


@dataclass(frozen=True)
class RefusalPolicy:
    """How many refusals in a row start a pause, and how long the first pause is."""

    limit: int = DEFAULT_REFUSAL_LIMIT
    pause: float = DEFAULT_REFUSAL_PAUSE
    max_pause: float = MAX_REFUSAL_PAUSE

    def __post_init__(self) -> None:
        if self.limit < 1:
            raise ValueError(f"the refusal limit must be at least 1, not {self.limit}")
        if not 0 < self.pause <= self.max_pause:
            raise ValueError(f"the refusal pause must be between 0 and {self.max_pause:g} s, not {self.pause:g}")


@dataclass
class _Streak:
    refusals: int = 0
    pauses: int = 0
    paused_until: float = 0.0


class RefusalTracker:
    """Refusal counts in a row per device key, and the pauses they start."""

    def __init__(self, policy: RefusalPolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self._clock = clock
        self._streaks: dict[bytes, _Streak] = {}

    def remaining_pause(self, device_key: bytes) -> float:
        """Return the seconds left in the device's pause, or 0.0 if it may be asked."""
        streak = self._streaks.get(device_key)
        if streak is None:
            return 0.0
        return max(0.0, streak.paused_until - self._clock())

    def refusals_in_a_row(self, device_key: bytes) -> int:
        streak = self._streaks.get(device_key)
        return 0 if streak is None else streak.refusals

    def refused(self, device_key: bytes) -> float:
        """Count a refusal; return the length of the pause it starts, or 0.0 for none."""
        streak = self._streaks.setdefault(device_key, _Streak())
        streak.refusals += 1
        if streak.refusals < self.policy.limit:
            return 0.0
        # Requests that were already waiting for the person when the pause
        # began may be refused during it; they do not stretch the pause.
        if self.remaining_pause(device_key) > 0:
            return 0.0
        pause = min(self.policy.pause * 2**streak.pauses, self.policy.max_pause)
        streak.pauses += 1
        streak.paused_until = self._clock() + pause
        return pause

    def approved(self, device_key: bytes) -> None:
        """End the device's streak of refusals."""
        self._streaks.pop(device_key, None)
