"""relay.delivery.destinations: per-destination slow start, backoff, dead marking and the
probe after it, with a fake clock (the module reads none)."""

from __future__ import annotations

from relay.dane.policy import DomainPlan, PlanAction
from relay.delivery.destinations import DEAD, Feedback, Sites, feedback
from relay.delivery.trace import AttemptReport, HostAttempt
from relay.model import Action, Outcome

FAIL = Outcome(Action.DEFERRED, "4.4.1", "connection failed (mx [192.0.2.1]: timeout)")
PLAN = DomainPlan("x.test", PlanAction.DELIVER, None, "test")


def host(phase: str = "", ip: str = "192.0.2.1", code: str = "4.4.1") -> HostAttempt:
    return HostAttempt(mx="mx.x.test", ip=ip, dnssec="insecure", tlsa="", code=code,
                       phase=phase)


def report(*hosts: HostAttempt, outcome: Outcome = FAIL, delivered: bool = False
           ) -> AttemptReport:
    return AttemptReport({"a@x.test": outcome}, hosts, PLAN,
                         delivered_by=hosts[-1] if delivered else None)


def test_feedback_of_an_attempt() -> None:
    ok = Outcome(Action.DELIVERED, "2.0.0", "250 ok")
    assert feedback(report(host(), outcome=ok, delivered=True)) is Feedback.POSITIVE
    # a server that took the transaction but refused the recipient still answers
    rejected = Outcome(Action.BOUNCED, "5.1.1", "550 no such user")
    assert feedback(report(host(), outcome=rejected, delivered=True)) is Feedback.POSITIVE
    # every address failed before a transaction: a site failure
    assert feedback(report(host("connect"), host("greeting", ip="192.0.2.2"))) \
        is Feedback.NEGATIVE
    assert feedback(report(host("ehlo"))) is Feedback.NEGATIVE
    # one address got further (TLS failed): the site answers; DANE is the job's policy
    assert feedback(report(host("connect"), host("tls", ip="192.0.2.2"))) is Feedback.NEUTRAL
    # DNS failures and hosts never tried (no address) say nothing about the site
    assert feedback(report(host("", ip="", code="4.4.312"))) is Feedback.NEUTRAL
    assert feedback(report()) is Feedback.NEUTRAL
    # a 5xx greeting bounces the mail at once: nothing left to suspend
    gone = Outcome(Action.BOUNCED, "5.0.0", "554 go away")
    assert feedback(report(host("greeting"), outcome=gone)) is Feedback.NEUTRAL


def test_slow_start_grows_the_window_up_to_the_limit() -> None:
    sites = Sites(limit=8, initial=3, dead_time=300)
    assert sites.free("x.test", 0) == 3  # an unknown destination starts at `initial`
    for _ in range(3):
        sites.started("x.test", 0)
    assert sites.free("x.test", 0) == 0 and sites.caps(0) == {"x.test": 0}
    for i in range(3):
        sites.finished("x.test", Feedback.POSITIVE, 1)
        assert sites.window("x.test", 1) == 4 + i
    sites.started("x.test", 1)
    for _ in range(20):
        sites.started("x.test", 1)
        sites.finished("x.test", Feedback.POSITIVE, 2)
    assert sites.window("x.test", 2) == 8  # never beyond the limit
    assert sites.free("x.test", 2) == 7


def test_initial_never_exceeds_the_limit() -> None:
    assert Sites(limit=2, initial=5, dead_time=1).free("a.test", 0) == 2


def test_a_destination_failing_its_first_connections_is_dead_then_probed() -> None:
    sites = Sites(limit=10, initial=5, dead_time=300)
    for _ in range(5):
        sites.started("dead.test", 0)
    changes = [sites.finished("dead.test", Feedback.NEGATIVE, 30 + i, FAIL) for i in range(3)]
    assert changes == [None, None, None]
    assert sites.window("dead.test", 33) == 2  # one less per failure
    change = sites.finished("dead.test", Feedback.NEGATIVE, 34, FAIL)  # the cohort is gone
    assert change is not None and change.kind == "dead" and change.dead is not None
    dead = change.dead
    assert (dead.domain, dead.code, dead.until, dead.failures) == ("dead.test", "4.4.1", 334, 4)
    assert dead.outcome() == Outcome(
        Action.DEFERRED, "4.4.1", f"delivery temporarily suspended: {FAIL.reply}")
    assert sites.dead("dead.test", 100) == dead
    assert sites.caps(100) == {"dead.test": DEAD} and sites.free("dead.test", 100) == DEAD
    # the last connection of the cohort fails too: nothing more to mark
    assert sites.finished("dead.test", Feedback.NEGATIVE, 35, FAIL) is None
    # the dead time is over: one connection probes it
    assert sites.dead("dead.test", 334) is None
    assert sites.free("dead.test", 334) == 1
    sites.started("dead.test", 334)
    assert sites.free("dead.test", 334) == 0
    # the probe fails: dead again at once
    change = sites.finished("dead.test", Feedback.NEGATIVE, 364, FAIL)
    assert change is not None and change.kind == "dead" and change.dead is not None
    assert change.dead.until == 664
    # the next probe succeeds: recovered, slow start from `initial` again
    sites.started("dead.test", 700)
    change = sites.finished("dead.test", Feedback.POSITIVE, 701)
    assert change is not None and change.kind == "recovered"
    assert sites.dead("dead.test", 701) is None and sites.window("dead.test", 701) == 5


def test_a_success_between_failures_keeps_the_destination_alive() -> None:
    sites = Sites(limit=10, initial=5, dead_time=300)
    for _ in range(10):
        sites.started("flaky.test", 0)
    for i in range(10):  # every other attempt fails: never a whole cohort in a row
        result = Feedback.NEGATIVE if i % 2 else Feedback.POSITIVE
        assert sites.finished("flaky.test", result, i, FAIL) is None
    assert sites.dead("flaky.test", 10) is None


def test_a_success_in_flight_when_marked_dead_brings_it_back() -> None:
    sites = Sites(limit=1, initial=1, dead_time=300)
    sites.started("x.test", 0)
    sites.started("x.test", 0)  # a split job beyond the window
    change = sites.finished("x.test", Feedback.NEGATIVE, 1, FAIL)  # window 1: dead at once
    assert change is not None and change.kind == "dead"
    change = sites.finished("x.test", Feedback.POSITIVE, 2)
    assert change is not None and change.kind == "recovered"
    assert sites.free("x.test", 2) == 1


def test_neutral_results_move_nothing_and_idle_destinations_are_forgotten() -> None:
    sites = Sites(limit=10, initial=5, dead_time=300)
    sites.started("x.test", 0)
    sites.finished("x.test", Feedback.POSITIVE, 1)
    sites.started("x.test", 1)
    assert sites.finished("x.test", Feedback.NEUTRAL, 2) is None
    assert sites.window("x.test", 2) == 6
    assert sites.caps(2) == {}  # nothing in flight, not dead: forgotten (as Postfix does)
    assert len(sites) == 0 and sites.window("x.test", 2) == 5


def test_failures_one_at_a_time_still_make_a_destination_dead() -> None:
    """A wave spread over many domains gives each one connection at a time: the
    failures must add up although nothing of the domain is in flight in between."""
    sites = Sites(limit=10, initial=5, dead_time=300)
    for i in range(3):
        sites.started("x.test", 100 * i)
        assert sites.finished("x.test", Feedback.NEGATIVE, 100 * i + 30, FAIL) is None
        assert sites.caps(100 * i + 31) == {"x.test": sites.window("x.test", 0)}
    sites.started("x.test", 300)
    change = sites.finished("x.test", Feedback.NEGATIVE, 330, FAIL)
    assert change is not None and change.kind == "dead" and change.dead is not None
    assert change.dead.failures == 4
    # a failure long ago is forgotten
    sites.started("y.test", 0)
    sites.finished("y.test", Feedback.NEGATIVE, 1, FAIL)
    assert sites.caps(302) == {"x.test": DEAD}


def test_a_probing_destination_is_remembered_for_one_dead_time() -> None:
    sites = Sites(limit=5, initial=1, dead_time=60)
    sites.started("x.test", 0)
    sites.finished("x.test", Feedback.NEGATIVE, 0, FAIL)  # dead until 60
    assert sites.caps(59) == {"x.test": DEAD}
    assert sites.caps(61) == {"x.test": 1}  # probing: one connection
    assert sites.caps(121) == {}  # no work came for it: forgotten


def test_no_dead_time_means_never_dead() -> None:
    sites = Sites(limit=5, initial=1, dead_time=0)
    sites.started("x.test", 0)
    assert sites.finished("x.test", Feedback.NEGATIVE, 0, FAIL) is None
    assert sites.dead("x.test", 0) is None
