"""TLS-RPT reporting periods (RFC 8460 §4.1): the interval grid and cuts.

Pure: times are passed in.
"""

from __future__ import annotations

import math


def grid_start(ts: float, interval: float) -> float:
    """The start of the interval-aligned period holding `ts` ("24h": 00:00 UTC)."""
    return math.floor(ts / interval) * interval


def new_period(now: float, interval: float, last_end: float | None) -> tuple[float, float]:
    """Bounds of the period to open at `now`: from the grid point (or where the last
    period ended, if later) to the next grid point after that start."""
    begin = grid_start(now, interval)
    if last_end is not None and last_end > begin:
        begin = last_end
    return begin, grid_start(begin, interval) + interval


def cut_end(now: float) -> float:
    """Where `relay tlsrpt send --now` ends the open period: the next whole second."""
    return float(math.ceil(now))
