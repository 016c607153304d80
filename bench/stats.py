"""Small statistics helpers shared by the benchmarks: percentiles, medians with spread."""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Figure", "Spread", "percentile", "spread"]


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """The nearest-rank percentile of already sorted values (0 for none)."""
    if not sorted_values:
        return 0.0
    index = max(0, min(len(sorted_values) - 1, int(len(sorted_values) * pct / 100 + 0.5) - 1))
    return float(sorted_values[index])


@dataclass(frozen=True)
class Spread:
    """Median and range of one figure measured several times."""

    median: float
    low: float
    high: float
    runs: int

    def json(self) -> dict[str, Any]:
        """The JSON form."""
        return {"median": self.median, "min": self.low, "max": self.high, "runs": self.runs}


def spread(values: Iterable[float]) -> Spread:
    """Median, min and max of ``values``."""
    items = list(values)
    if not items:
        return Spread(0.0, 0.0, 0.0, 0)
    return Spread(statistics.median(items), min(items), max(items), len(items))


@dataclass
class Figure:
    """One reported figure: its measurements, target and whether the target is met."""

    key: str
    label: str
    unit: str
    value: Spread
    target: str = ""
    met: bool | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def json(self) -> dict[str, Any]:
        """The JSON form (``extra`` holds per-run details)."""
        out: dict[str, Any] = {"label": self.label, "unit": self.unit, **self.value.json(),
                               "target": self.target or None, "met": self.met}
        if self.note:
            out["note"] = self.note
        if self.extra:
            out["details"] = self.extra
        return out
