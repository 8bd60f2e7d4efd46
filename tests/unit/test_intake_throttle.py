"""relay.intake.throttle: failed AUTH per address, with the clock passed in."""

from __future__ import annotations

from relay.intake.throttle import MAX_DELAY_FACTOR, AuthThrottle


def test_delay_doubles_then_lockout_then_a_fresh_start() -> None:
    t = AuthThrottle(delay=1.0, limit=4, window=600, lockout=300)
    verdicts = [t.failed("192.0.2.1", now=10.0 + i) for i in range(4)]
    assert [v.delay for v in verdicts] == [1.0, 2.0, 4.0, 8.0]
    assert [v.locked_for for v in verdicts] == [None, None, None, 300]
    assert t.locked("192.0.2.1", now=14.0) == 299.0
    assert t.locked("192.0.2.2", now=14.0) is None  # another address is not concerned
    assert t.locked("192.0.2.1", now=313.0) is None  # the lockout is over
    assert t.failed("192.0.2.1", now=313.0).delay == 1.0  # and it starts afresh


def test_failures_outside_the_window_are_forgotten() -> None:
    t = AuthThrottle(delay=0.5, limit=3, window=60, lockout=60)
    t.failed("a", now=0.0)
    t.failed("a", now=30.0)
    v = t.failed("a", now=100.0)  # the first two are older than the window
    assert (v.failures, v.delay, v.locked_for) == (1, 0.5, None)


def test_delay_is_capped_and_limit_zero_never_locks() -> None:
    t = AuthThrottle(delay=1.0, limit=0, window=10_000, lockout=60)
    delays = [t.failed("a", now=float(i)).delay for i in range(40)]
    assert max(delays) == MAX_DELAY_FACTOR and t.locked("a", now=41.0) is None
    assert AuthThrottle(delay=0.0).failed("a", now=0.0).delay == 0.0


def test_the_table_is_bounded() -> None:
    t = AuthThrottle(limit=2, max_clients=100)
    for i in range(1000):
        t.failed(f"10.0.{i // 256}.{i % 256}", now=float(i))
    assert len(t) == 100
    # the most recent addresses are remembered: a second failure locks it out
    assert t.failed("10.0.3.231", now=1000.0).locked_for is not None
    assert t.failed("10.0.0.0", now=1000.0).failures == 1  # the oldest were forgotten
