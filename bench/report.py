"""Printing the final table and writing the JSON results."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bench.stats import Figure

__all__ = ["fmt_value", "print_table", "write_json"]


def _num(value: float, unit: str) -> str:
    if unit in {"/s", "calls/s", "rec/s"} or abs(value) >= 1000:
        return f"{value:,.0f}"
    if unit == "x" or abs(value) >= 100:
        return f"{value:.2f}" if unit == "x" else f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"


def fmt_value(fig: Figure) -> str:
    """``median [min-max] unit`` (just the median for a single run)."""
    v = fig.value
    unit = f" {fig.unit}" if fig.unit else ""
    if v.runs <= 1 or v.low == v.high:
        return f"{_num(v.median, fig.unit)}{unit}"
    return f"{_num(v.median, fig.unit)} [{_num(v.low, fig.unit)}-{_num(v.high, fig.unit)}]{unit}"


def print_table(figures: Iterable[Figure]) -> None:
    """The final ``figure | measured | target | met?`` table."""
    rows = [(f.label, fmt_value(f), f.target or "-",
             "-" if f.met is None else ("yes" if f.met else "NO"), f.note) for f in figures]
    headers = ("figure", "measured", "target", "met?")
    print("measured = median [min-max] over the runs of one invocation")
    widths = [max(len(headers[i]), *(len(r[i]) for r in rows)) for i in range(4)]
    line = " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    print(line)
    print("-+-".join("-" * w for w in widths))
    for row in rows:
        text = " | ".join(c.ljust(w) for c, w in zip(row[:4], widths, strict=True))
        print(f"{text}   {row[4]}" if row[4] else text)


def write_json(path: Path, meta: dict[str, Any], figures: Iterable[Figure],
               sections: dict[str, Any]) -> None:
    """Write every figure (and per-section details) to ``path``."""
    data = {"meta": meta, "figures": {f.key: f.json() for f in figures}, "sections": sections}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
