"""When to retry a deferred recipient, and when it expires. Pure: times are passed in.

The schedule (`delivery.retry_schedule`) is a list of gaps in seconds; the last one
repeats. ``(900,)`` means every 15 minutes; ``(900, 900, 3600)`` is the source service's
15 minutes, 15 minutes, then hourly. Together with `delivery.max_lifetime` it defines a
fixed **plan** of attempt times measured from the message's arrival::

    T0 = received_at, T1 = T0 + gap1, T2 = T1 + gap2, ...   while Tk <= received_at + lifetime

The rules:

1. **Attempts are due at plan points.** After a failed attempt at time *t*, the next
   attempt is due at the first plan point strictly after *t*. The plan is anchored to the
   arrival time, not to the previous attempt, so lateness does not accumulate: an attempt
   that starts a little late (a busy scheduler, a slow DNS answer, an attempt that ran into
   timeouts) does not push every later attempt back. A manual `relay queue retry` or an
   outage likewise neither shortens the lifetime nor causes a burst of catch-up attempts:
   the next attempt is simply the next plan point.
2. **The lifetime bound is inclusive.** A plan point equal to ``received_at + lifetime``
   is attempted; none after it is. With the default (every 15 minutes for 24 hours) the
   last attempt is at 24h exactly, so a message that expires has seen 24 hours of
   failures, as SPEC.md says ("After 24 hours of failures the message expires"), and
   like Postfix, which bounces a message older than `maximal_queue_lifetime` at its next
   failed attempt rather than before it.
3. **Expiry** happens when a failed attempt leaves no plan point after it:
   `next_attempt` returns None and the caller bounces the recipient with the 5.x.x form
   of its last code (`relay.delivery.classify.expire`). An attempt that ran after the deadline
   (because the relay was down) therefore expires at once when it fails.

Counting, for tests and operators: the number of attempts is `planned_attempts(schedule,
lifetime)` whenever every attempt starts before the next plan point (lateness below one
gap). ``("1s",)`` with lifetime ``"8s"`` gives 9 attempts, at 0, 1, ..., 8 s after
arrival, and the recipient expires when the attempt at 8 s fails. The default gives 97
attempts (0, 15m, ..., 24h).

Gaps below `MIN_DELAY` are raised to it, so that a ``0`` in the schedule cannot turn into
a hot loop (or an endless plan).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

MIN_DELAY = 0.1  # seconds: the smallest gap between two plan points
_EPS = 1e-6  # seconds: float slack when comparing plan points with times


def _gaps(schedule: Sequence[float]) -> list[float]:
    if not schedule:
        raise ValueError("retry schedule must have at least one entry")
    return [max(float(g), MIN_DELAY) for g in schedule]


def delay_after(attempts: int, schedule: Sequence[float]) -> float:
    """The planned gap after the `attempts`-th attempt (1-based); the last entry repeats."""
    gaps = _gaps(schedule)
    return gaps[min(max(attempts, 1), len(gaps)) - 1]


def deadline(received_at: float, max_lifetime: float) -> float:
    """The last moment at which an attempt may be due (inclusive)."""
    return received_at + max(float(max_lifetime), 0.0)


def plan_offset(index: int, schedule: Sequence[float]) -> float:
    """Offset from arrival of plan point `index` (0 = the first attempt, at arrival)."""
    gaps = _gaps(schedule)
    if index <= 0:
        return 0.0
    explicit = min(index, len(gaps))
    offset = math.fsum(gaps[:explicit])
    return offset + (index - explicit) * gaps[-1]


def planned_attempts(schedule: Sequence[float], max_lifetime: float) -> int:
    """How many attempts the plan holds: the plan points within the lifetime (inclusive)."""
    gaps = _gaps(schedule)
    lifetime = max(float(max_lifetime), 0.0)
    count, offset = 1, 0.0  # the first attempt, at arrival
    for gap in gaps[:-1]:
        offset += gap
        if offset > lifetime + _EPS:
            return count
        count += 1
    # The repeating gap: points at offset + n * last for n >= 1.
    return count + math.floor((lifetime - offset + _EPS) / gaps[-1])


def plan(schedule: Sequence[float], max_lifetime: float) -> list[float]:
    """Every plan point as an offset from arrival (for traces, docs and tests)."""
    return [plan_offset(i, schedule) for i in range(planned_attempts(schedule, max_lifetime))]


def _first_point_after(offset: float, schedule: Sequence[float]) -> int:
    """The index of the first plan point strictly after `offset` (seconds from arrival)."""
    gaps = _gaps(schedule)
    point = 0.0
    index = 0
    for gap in gaps[:-1]:
        if point > offset + _EPS:
            return index
        point += gap
        index += 1
    if point > offset + _EPS:
        return index
    # In the repeating tail: point + n * last > offset.
    n = math.floor((offset + _EPS - point) / gaps[-1]) + 1
    return index + n


def next_attempt(
    received_at: float,
    attempts: int,
    last_attempt_at: float,
    schedule: Sequence[float],
    max_lifetime: float,
) -> float | None:
    """When the next attempt is due after `attempts` failed attempts, or None: expired.

    `attempts` = 0 means no attempt has been made: due at `received_at`. Otherwise the
    result is the first plan point strictly after `last_attempt_at` (see the module
    docstring), or None when that point lies beyond ``received_at + max_lifetime``.
    The result depends on `attempts` only through that zero case: the plan is anchored to
    the arrival time, so a late, early (manual) or long attempt does not shift it.
    """
    if attempts <= 0:
        return received_at
    index = _first_point_after(last_attempt_at - received_at, schedule)
    offset = plan_offset(index, schedule)
    if offset > max(float(max_lifetime), 0.0) + _EPS:
        return None
    return received_at + offset


def expired(
    received_at: float,
    last_attempt_at: float,
    schedule: Sequence[float],
    max_lifetime: float,
) -> bool:
    """True when a failure at `last_attempt_at` ends the recipient's life (no point left)."""
    return next_attempt(received_at, 1, last_attempt_at, schedule, max_lifetime) is None


def delay_warning_due(
    received_at: float,
    now: float,
    warning_after: float | None,
    already_sent: bool,
) -> bool:
    """Whether to send the (single) delay warning now.

    `warning_after` is `ndr.delay_warning` in seconds (None = off, the default). Due once
    the message has waited at least that long, and only if none was sent before. The caller
    also skips it for null senders (as for NDRs) and for recipients already final.
    """
    if warning_after is None or already_sent:
        return False
    return now >= received_at + max(float(warning_after), 0.0)
