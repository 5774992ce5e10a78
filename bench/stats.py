"""Medians, 95th percentiles and ratios of timing samples."""

from __future__ import annotations

import statistics
from dataclasses import dataclass


def percentile(samples: list[float], fraction: float) -> float:
    """Return the sample at ``fraction`` of the sorted list (nearest rank)."""
    if not samples:
        raise ValueError("no samples to take a percentile of")
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


@dataclass(frozen=True)
class Summary:
    """Median and 95th percentile of one series, in the unit it was taken in."""

    count: int
    median: float
    p95: float

    @classmethod
    def of(cls, samples: list[float]) -> "Summary":
        return cls(count=len(samples), median=statistics.median(samples), p95=percentile(samples, 0.95))

    def to_json(self) -> dict[str, float]:
        return {"count": self.count, "median": self.median, "p95": self.p95}
