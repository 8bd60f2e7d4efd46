"""relay.delivery.retry: the attempt plan, expiry and delay warnings (a fake clock:
plain floats)."""

from __future__ import annotations

import itertools
import random

import pytest

from relay.config import parse_duration
from relay.delivery import retry

T0 = 1_700_000_000.0  # an arbitrary arrival time
DEFAULT = (900.0,)
SOURCE = (900.0, 900.0, 3600.0)  # the source service: 15m, 15m, then hourly
DAY = 86400.0


def run(schedule: tuple[float, ...], lifetime: float, lateness=lambda k: 0.0) -> list[float]:
    """Simulate a recipient that always fails: the times of its attempts (from arrival).

    `lateness(k)` is how late attempt k starts after it was due.
    """
    times: list[float] = []
    due = retry.next_attempt(T0, 0, T0, schedule, lifetime)
    while due is not None:
        at = due + lateness(len(times))
        times.append(at - T0)
        due = retry.next_attempt(T0, len(times), at, schedule, lifetime)
        assert len(times) < 10_000, "runaway plan"
    return times


# --- the documented counts ----------------------------------------------------------------


def test_one_second_for_eight_seconds_is_nine_attempts() -> None:
    times = run((1.0,), 8.0)
    assert times == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    assert retry.planned_attempts((1.0,), 8.0) == 9


def test_default_is_every_15_minutes_for_24_hours() -> None:
    times = run(DEFAULT, DAY)
    assert len(times) == 97 == retry.planned_attempts(DEFAULT, DAY)
    assert times[1] == 900 and times[-1] == DAY
    assert all(b - a == 900 for a, b in itertools.pairwise(times))


def test_source_service_schedule() -> None:
    times = run(SOURCE, DAY)
    assert times[:5] == [0, 900, 1800, 5400, 9000]
    # 0, 15m, 30m, then hourly from 1h30: 1h30 ... 23h30 is 23 more.
    assert len(times) == 3 + 23 == retry.planned_attempts(SOURCE, DAY)
    assert times[-1] == 23 * 3600 + 1800


def test_postfix_like_backoff_schedule() -> None:
    sched = tuple(parse_duration(x) for x in ("5m", "10m", "20m", "40m", "66m"))
    times = run(sched, 5 * DAY)
    assert times[:6] == [0, 300, 900, 2100, 4500, 8460]
    assert all(b - a == 3960 for a, b in itertools.pairwise(times[5:]))
    assert times[-1] <= 5 * DAY < times[-1] + 3960
    assert retry.plan(sched, 5 * DAY) == times


@pytest.mark.parametrize(
    ("schedule", "lifetime", "count"),
    [
        ((1.0,), 0.0, 1),  # no lifetime: one attempt, expire when it fails
        ((1.0,), 0.5, 1),
        ((1.0,), 1.0, 2),  # the bound is inclusive
        ((1.0,), 1.5, 2),
        ((10.0, 1.0), 5.0, 1),  # the first gap already lies beyond the lifetime
        ((10.0, 1.0), 10.0, 2),
        ((10.0, 1.0), 13.0, 5),
        ((0.1,), 1.0, 11),  # float sums: 0.1 * 10 must count as 1.0
        ((3.0, 3.0, 3.0), 9.0, 4),
    ],
)
def test_planned_attempts(schedule: tuple[float, ...], lifetime: float, count: int) -> None:
    assert retry.planned_attempts(schedule, lifetime) == count
    assert len(run(schedule, lifetime)) == count
    assert len(retry.plan(schedule, lifetime)) == count


# --- the edge rule and robustness ------------------------------------------------------------


def test_attempt_due_exactly_at_deadline_happens_then_expires() -> None:
    assert retry.next_attempt(T0, 8, T0 + 7, (1.0,), 8.0) == T0 + 8
    assert retry.next_attempt(T0, 9, T0 + 8, (1.0,), 8.0) is None
    assert retry.expired(T0, T0 + 8, (1.0,), 8.0)
    assert not retry.expired(T0, T0 + 7.999, (1.0,), 8.0)


def test_lateness_below_one_gap_does_not_change_the_count() -> None:
    rng = random.Random(7)
    for _ in range(50):
        late = [rng.uniform(0, 0.95) for _ in range(20)]
        times = run((1.0,), 8.0, lambda k, late=late: late[k])
        assert len(times) == 9
        # Lateness does not accumulate: attempt k starts within its own slot.
        assert all(k <= t < k + 1 for k, t in enumerate(times))


def test_constant_lateness_does_not_accumulate() -> None:
    times = run(DEFAULT, DAY, lambda k: 300.0)  # every attempt 5 minutes late
    assert len(times) == 97
    assert times[-1] == DAY + 300


def test_late_attempt_skips_to_the_next_plan_point_without_burst() -> None:
    # The relay was down from 1h to 5h: one attempt on restart, then the plan again.
    due = retry.next_attempt(T0, 5, T0 + 5 * 3600 + 10, DEFAULT, DAY)
    assert due == T0 + 5 * 3600 + 900


def test_outage_past_the_deadline_expires_at_the_next_failure() -> None:
    assert retry.next_attempt(T0, 3, T0 + DAY + 7200, DEFAULT, DAY) is None


def test_manual_retry_does_not_consume_the_lifetime() -> None:
    # 200 manual retries within the first minute: the plan is anchored to arrival.
    for i in range(1, 200):
        due = retry.next_attempt(T0, i, T0 + i * 0.25, DEFAULT, DAY)
        assert due == T0 + 900
    # After the 15-minute attempt the next is at 30 minutes, whatever the count says.
    assert retry.next_attempt(T0, 250, T0 + 900.2, DEFAULT, DAY) == T0 + 1800


def test_attempt_within_float_slack_of_a_point_counts_as_that_point() -> None:
    assert retry.next_attempt(T0, 1, T0 + 900 - 1e-9, DEFAULT, DAY) == T0 + 1800


def test_first_attempt_due_at_arrival() -> None:
    assert retry.next_attempt(T0, 0, 0.0, DEFAULT, DAY) == T0


def test_attempt_before_arrival_clock_skew() -> None:
    # A last attempt stamped before arrival (clock step): the next point after it.
    assert retry.next_attempt(T0, 1, T0 - 5, DEFAULT, DAY) == T0


def test_result_is_always_after_last_attempt_and_on_the_plan() -> None:
    rng = random.Random(3)
    for _ in range(300):
        sched = tuple(rng.choice([1.0, 2.5, 60.0, 900.0]) for _ in range(rng.randint(1, 4)))
        lifetime = rng.uniform(0, 5000)
        last = T0 + rng.uniform(0, 6000)
        due = retry.next_attempt(T0, rng.randint(1, 50), last, sched, lifetime)
        points = retry.plan(sched, lifetime)
        later = [p for p in points if T0 + p > last + 1e-6]
        if due is None:
            assert later == []
        else:
            assert due > last
            assert due - T0 == pytest.approx(later[0])


def test_zero_gap_is_raised_to_the_minimum() -> None:
    assert retry.delay_after(1, (0.0,)) == retry.MIN_DELAY
    assert retry.planned_attempts((0.0,), 1.0) == 11
    assert retry.next_attempt(T0, 1, T0, (0.0,), 1.0) == pytest.approx(T0 + retry.MIN_DELAY)


def test_empty_schedule_is_rejected() -> None:
    with pytest.raises(ValueError):
        retry.next_attempt(T0, 1, T0, (), DAY)


def test_delay_after_repeats_the_last_entry() -> None:
    assert [retry.delay_after(i, SOURCE) for i in range(1, 7)] == [900, 900, 3600, 3600,
                                                                    3600, 3600]
    assert retry.delay_after(0, SOURCE) == 900


def test_plan_offset_and_deadline() -> None:
    assert retry.plan_offset(0, SOURCE) == 0
    assert retry.plan_offset(3, SOURCE) == 5400
    assert retry.plan_offset(10, SOURCE) == 1800 + 8 * 3600
    assert retry.deadline(T0, DAY) == T0 + DAY
    assert retry.deadline(T0, -5) == T0


# --- delay warnings ------------------------------------------------------------------------


def test_delay_warning_off_by_default() -> None:
    assert not retry.delay_warning_due(T0, T0 + 10 * DAY, None, False)


def test_delay_warning_due_once_after_the_delay() -> None:
    assert not retry.delay_warning_due(T0, T0 + 4 * 3600 - 1, 4 * 3600, False)
    assert retry.delay_warning_due(T0, T0 + 4 * 3600, 4 * 3600, False)
    assert retry.delay_warning_due(T0, T0 + 5 * 3600, 4 * 3600, False)
    assert not retry.delay_warning_due(T0, T0 + 5 * 3600, 4 * 3600, True)
