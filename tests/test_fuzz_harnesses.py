"""The fuzz harnesses of tests/fuzz run on their seeds, without atheris.

scripts/fuzz runs them for minutes or hours under atheris; this keeps them
working between such runs as the product changes.
"""

from __future__ import annotations

import pytest

from tests.fuzz.targets import TARGETS, HarnessFailure, check

# Inputs every target must survive besides its seeds.
JUNK = [b"", b"\x00", b"\xff" * 7, b"\x00\x00\x00\x01\x0b", bytes(range(256))]


@pytest.mark.parametrize("name", TARGETS)
def test_harness_runs_on_seeds(name: str) -> None:
    target = TARGETS[name]
    seeds = target.seeds()
    assert seeds, f"target {name} has no seed inputs"
    assert all(len(seed) <= target.max_len for seed in seeds)
    try:
        for data in [*seeds, *JUNK]:
            target.run(data)
    finally:
        target.close()


def test_harness_check_raises() -> None:
    with pytest.raises(HarnessFailure, match="broken"):
        check(False, "broken")
