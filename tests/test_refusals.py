"""RefusalTracker: refusals in a row per device, and the pauses they start."""

from __future__ import annotations

import pytest

from tpmsigner.signer.refusals import RefusalPolicy, RefusalTracker

DEVICE = b"d" * 32
OTHER = b"o" * 32


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_pause_starts_at_the_limit_and_doubles() -> None:
    clock = Clock()
    tracker = RefusalTracker(RefusalPolicy(limit=3, pause=10.0, max_pause=25.0), clock)

    assert [tracker.refused(DEVICE) for _ in range(2)] == [0.0, 0.0]
    assert tracker.remaining_pause(DEVICE) == 0.0
    assert tracker.refused(DEVICE) == 10.0
    assert tracker.remaining_pause(DEVICE) == 10.0
    assert tracker.remaining_pause(OTHER) == 0.0

    clock.now += 10.0
    assert tracker.remaining_pause(DEVICE) == 0.0
    assert tracker.refused(DEVICE) == 20.0
    clock.now += 20.0
    # The doubling stops at max_pause.
    assert tracker.refused(DEVICE) == 25.0
    assert tracker.refusals_in_a_row(DEVICE) == 5


def test_refusals_during_a_pause_do_not_stretch_it() -> None:
    clock = Clock()
    tracker = RefusalTracker(RefusalPolicy(limit=1, pause=5.0), clock)

    assert tracker.refused(DEVICE) == 5.0
    clock.now += 1.0
    assert tracker.refused(DEVICE) == 0.0
    assert tracker.remaining_pause(DEVICE) == 4.0


def test_approval_ends_the_streak() -> None:
    clock = Clock()
    tracker = RefusalTracker(RefusalPolicy(limit=2, pause=5.0), clock)
    tracker.refused(DEVICE)
    tracker.approved(DEVICE)

    assert tracker.refusals_in_a_row(DEVICE) == 0
    assert tracker.refused(DEVICE) == 0.0


@pytest.mark.parametrize(("limit", "pause"), [(0, 5.0), (3, 0.0), (3, 601.0)])
def test_policy_rejects_nonsense(limit: int, pause: float) -> None:
    with pytest.raises(ValueError):
        RefusalPolicy(limit=limit, pause=pause)
