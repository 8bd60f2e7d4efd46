"""The scheduler against a real SQLite store: concurrency limits, surviving a locked
database, leases. The deliverer here is a stub that records what it is asked (delivery
itself is tested end to end in tests/e2e/test_delivery*.py)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from relay import log
from relay.config import build
from relay.dane.policy import DomainPlan, PlanAction
from relay.delivery.scheduler import Scheduler
from relay.delivery.trace import AttemptReport, HostAttempt
from relay.model import Action, Envelope, Outcome
from relay.store import Store


class StubDeliverer:
    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.active: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.total_peak = 0
        self.calls: list[tuple[str, tuple[str, ...]]] = []

    async def deliver(self, domain: str, sender: str, recipients: Any, body: bytes,
                      **kw: Any) -> AttemptReport:
        self.calls.append((domain, tuple(recipients)))
        self.active[domain] = self.active.get(domain, 0) + 1
        self.peak[domain] = max(self.peak.get(domain, 0), self.active[domain])
        self.total_peak = max(self.total_peak, sum(self.active.values()))
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.active[domain] -= 1
        ok = Outcome(Action.DELIVERED, "2.0.0", "250 ok")
        plan = DomainPlan(domain, PlanAction.DELIVER, None, "stub")
        host = HostAttempt(mx=f"mx.{domain}", ip="192.0.2.25", dnssec="insecure", tlsa="",
                           code="2.0.0", reply="250 ok", security="plain")
        return AttemptReport({r: ok for r in recipients}, (host,), plan, delivered_by=host)

    async def close(self) -> None:
        return None


def _cfg(**delivery: Any) -> Any:
    return build({"delivery": {"poll_interval": "0.05s", **delivery}}, source="test")


async def _enqueue(store: Store, rcpts: list[str]) -> str:
    env = Envelope(sender="a@example.org", recipients=tuple(rcpts),
                   body=b"Subject: x\r\n\r\nhi\r\n")
    return await store.enqueue(env, now=1.0)


async def _wait_all_delivered(store: Store, ids: list[str], within: float = 10) -> None:
    async with asyncio.timeout(within):
        while True:
            infos = [await store.get_message(i) for i in ids]
            if all(r.status.value == "delivered" for m in infos for r in m.recipients):
                return
            await asyncio.sleep(0.05)


async def test_limits_per_domain_and_in_total(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "q.db")
    stub = StubDeliverer(delay=0.15)
    sched = Scheduler(store, stub, _cfg(max_connections=3, max_connections_per_domain=2),  # type: ignore[arg-type]
                      hostname="relay.test")
    ids = [await _enqueue(store, [f"u{i}@one.test"]) for i in range(6)]
    ids += [await _enqueue(store, [f"u{i}@two.test"]) for i in range(4)]
    await sched.start()
    try:
        await _wait_all_delivered(store, ids)
    finally:
        await sched.stop()
        await store.close()
    assert stub.peak["one.test"] == 2 and stub.peak["two.test"] <= 2
    assert stub.total_peak == 3
    assert len(stub.calls) == 10


async def test_recipients_of_one_message_and_domain_share_one_transaction(
        tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "q.db")
    stub = StubDeliverer()
    sched = Scheduler(store, stub, _cfg(), hostname="relay.test")  # type: ignore[arg-type]
    qid = await _enqueue(store, ["a@one.test", "b@one.test", "c@two.test"])
    await sched.start()
    try:
        await _wait_all_delivered(store, [qid])
    finally:
        await sched.stop()
        await store.close()
    assert sorted(stub.calls) == [("one.test", ("a@one.test", "b@one.test")),
                                  ("two.test", ("c@two.test",))]


async def test_survives_a_locked_database_and_delivers_afterwards(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    store = await Store.open(path, busy_timeout=0.1)
    stub = StubDeliverer()
    sched = Scheduler(store, stub, _cfg(), hostname="relay.test")  # type: ignore[arg-type]
    qid = await _enqueue(store, ["a@one.test"])
    locker = sqlite3.connect(path, timeout=0, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")  # e.g. an operator's long transaction
    await sched.start()
    try:
        await asyncio.sleep(0.6)
        assert not stub.calls  # nothing could be claimed, and the loop is still alive
        assert sched._loop_task is not None and not sched._loop_task.done()
        locker.execute("COMMIT")
        await _wait_all_delivered(store, [qid])
    finally:
        locker.close()
        await sched.stop()
        await store.close()
    assert stub.calls == [("one.test", ("a@one.test",))]


class BouncingDeliverer(StubDeliverer):
    """Bounces every recipient at one.test (5.1.1); delivers the others."""

    async def deliver(self, domain: str, sender: str, recipients: Any, body: bytes,
                      **kw: Any) -> AttemptReport:
        if domain != "one.test":
            return await super().deliver(domain, sender, recipients, body, **kw)
        self.calls.append((domain, tuple(recipients)))
        out = Outcome(Action.BOUNCED, "5.1.1", "550 5.1.1 no such user")
        plan = DomainPlan(domain, PlanAction.DELIVER, None, "stub")
        return AttemptReport({r: out for r in recipients}, (), plan)


async def test_an_ndr_left_pending_by_a_locked_database_is_sent_by_the_running_sweep(
        tmp_path: Path) -> None:
    """Issue 10: an NDR that could not be queued (here: another process holds the
    database's write lock from the moment the bounce was recorded, past the busy
    timeout) stays pending, and the running scheduler's periodic sweep sends it once the
    lock is gone, without a restart, exactly once."""
    events: list[tuple[str, dict[str, Any]]] = []
    logged = asyncio.Event()

    def observe(name: str, fields: dict[str, Any]) -> None:
        events.append((name, dict(fields)))
        logged.set()

    async def until(pred: Callable[[], bool]) -> None:
        while not pred():
            logged.clear()
            await logged.wait()

    def count(name: str, **match: Any) -> int:
        return sum(1 for n, f in events
                   if n == name and all(f.get(k) == v for k, v in match.items()))

    path = tmp_path / "q.db"
    store = await Store.open(path, busy_timeout=0.2)
    qid = await store.enqueue(Envelope(sender="a@example.org", recipients=("b@one.test",),
                                       body=b"Subject: x\r\n\r\nhi\r\n"), now=1.0)
    # waits (up to 10 s, in a thread: the event loop must go on to finish a write of the
    # scheduler that is in flight) for the write lock, then holds it
    locker = sqlite3.connect(path, timeout=10, isolation_level=None, check_same_thread=False)
    record = store.record
    locked = False

    async def record_then_lock(*args: Any, **kw: Any) -> None:
        nonlocal locked
        await record(*args, **kw)
        if not locked:  # once, right after the bounce was recorded
            locked = True
            # e.g. an operator's long transaction
            await asyncio.to_thread(locker.execute, "BEGIN IMMEDIATE")

    store.record = record_then_lock  # type: ignore[method-assign]
    sched = Scheduler(store, BouncingDeliverer(), _cfg(), hostname="relay.test",  # type: ignore[arg-type]
                      sweep_every=0.2)
    log.observers.append(observe)
    await sched.start()
    try:
        async with asyncio.timeout(30):
            await until(lambda: count("storage_error", kind="notice", id=qid) > 0)
            # swept again and again while locked: still pending, nothing queued
            sweeps = count("storage_error", kind="sweep")
            await until(lambda: count("storage_error", kind="sweep") >= sweeps + 2)
            assert count("ndr_sent") == 0
            locker.execute("COMMIT")  # the lock is gone
            await until(lambda: count("ndr_sent") > 0)
            await until(lambda: count("delivered") > 0)  # the NDR itself
        await asyncio.sleep(0.6)  # a few more sweeps: nothing is sent twice
    finally:
        log.observers.remove(observe)
        if locker.in_transaction:
            locker.execute("COMMIT")
        locker.close()
        await sched.stop()
    try:
        assert [f["id"] for n, f in events if n == "ndr_sent"] == [qid]
        assert await store.pending_ndrs() == []
        ndrs = [m for m in await store.list_messages(include_final=True) if m.sender == ""]
        assert len(ndrs) == 1 and ndrs[0].recipients[0].address == "a@example.org"
        assert count("internal_error") == 0 and count("expired") == 0
        assert count("bounced", id=qid) == 1
    finally:
        await store.close()


async def test_the_ndr_of_an_smtputf8_message_is_a_global_report_sent_with_smtputf8(
        tmp_path: Path) -> None:
    """RFC 6533: the report about an SMTPUTF8 message is message/global-delivery-status and
    goes out flagged SMTPUTF8, also when its sender's address is plain ASCII."""
    store = await Store.open(tmp_path / "q.db")
    qid = await store.enqueue(Envelope(sender="a@example.org", recipients=("b@one.test",),
                                       body="Subject: grüße\r\n\r\nhi\r\n".encode(),
                                       smtputf8=True), now=1.0)
    sent: list[tuple[bytes, dict[str, Any]]] = []
    got = asyncio.Event()

    class Recording(BouncingDeliverer):
        async def deliver(self, domain: str, sender: str, recipients: Any, body: bytes,
                          **kw: Any) -> AttemptReport:
            if domain != "one.test":
                sent.append((body, kw))
                got.set()
            return await super().deliver(domain, sender, recipients, body, **kw)

    sched = Scheduler(store, Recording(), _cfg(), hostname="relay.test")  # type: ignore[arg-type]
    await sched.start()
    try:
        async with asyncio.timeout(20):
            await got.wait()
        ((body, kw),) = sent
        assert kw["smtputf8"] is True  # delivered as an SMTPUTF8 message
        assert b"message/global-delivery-status" in body
        (ndr,) = [m for m in await store.list_messages(include_final=True) if m.sender == ""]
        assert (await store.get_message(ndr.id)).extra["original"] == qid
    finally:
        await sched.stop()
        await store.close()


# --- head-of-line blocking (issue 14): limits in the claim, reserve, dead destinations ---


class GatedDeliverer(StubDeliverer):
    """Holds every attempt to a domain ending in `.slow.test` until `gate` is set; fails
    every attempt to `.dead.test` at connect (a site failure); delivers the rest."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.changed = asyncio.Event()
        self.failing = True

    async def deliver(self, domain: str, sender: str, recipients: Any, body: bytes,
                      **kw: Any) -> AttemptReport:
        plan = DomainPlan(domain, PlanAction.DELIVER, None, "stub")
        if domain.endswith(".dead.test") and self.failing:
            self.calls.append((domain, tuple(recipients)))
            self.changed.set()
            await asyncio.sleep(0.05)
            out = Outcome(Action.DEFERRED, "4.4.1", f"connection failed (mx.{domain} "
                          "[192.0.2.9]: timeout after 30s connecting)")
            host = HostAttempt(mx=f"mx.{domain}", ip="192.0.2.9", dnssec="insecure",
                               tlsa="", code="4.4.1", security="failed", phase="connect")
            return AttemptReport({r: out for r in recipients}, (host,), plan)
        if domain.endswith(".slow.test"):
            self.active[domain] = self.active.get(domain, 0) + 1
            self.changed.set()
            try:
                await self.gate.wait()
            finally:
                self.active[domain] -= 1
        return await super().deliver(domain, sender, recipients, body, **kw)


async def _deferred_backlog(store: Store, path: Path, rcpts: list[str], *, now: float
                            ) -> list[str]:
    ids = [await _enqueue(store, [r]) for r in rcpts]
    with sqlite3.connect(path) as conn:  # tried once before, due again now
        conn.execute("UPDATE recipients SET status = 'deferred', attempts = 1, "
                     "next_attempt_at = ?", (now,))
    return ids


async def _until(cond: Callable[[], bool], event: asyncio.Event, within: float = 20) -> None:
    async with asyncio.timeout(within):
        while not cond():
            event.clear()
            await event.wait()


async def test_new_mail_gets_a_slot_while_retries_to_slow_sites_hold_the_rest(
        tmp_path: Path) -> None:
    """Deferred mail may use all but `reserved_connections` slots: with every one of those
    held by retries to sites that never answer, new mail is still delivered."""
    path = tmp_path / "q.db"
    store = await Store.open(path)
    stub = GatedDeliverer()
    cfg = _cfg(max_connections=5, reserved_connections=1, max_connections_per_domain=3)
    await _deferred_backlog(store, path, [f"u{i}@d{i}.slow.test" for i in range(20)], now=1.0)
    sched = Scheduler(store, stub, cfg, hostname="relay.test")  # type: ignore[arg-type]
    await sched.start()
    try:
        await _until(lambda: sum(stub.active.values()) == 4, stub.changed)
        new = await _enqueue(store, ["b@new.test"])
        await _wait_all_delivered(store, [new])  # while the four retries still hang
        assert sum(stub.active.values()) == 4 and not stub.gate.is_set()
        assert [c for c in stub.calls if c[0] == "new.test"] == [("new.test", ("b@new.test",))]
    finally:
        stub.gate.set()
        await sched.stop()
        await store.close()


async def test_claimed_work_never_waits_for_its_domain_while_holding_a_slot(
        tmp_path: Path) -> None:
    """Issue 14: jobs used to be claimed past their domain's limit and then wait for it
    holding a global slot. Now the claim hands out only what may start: a domain at its
    limit leaves the other slots to other domains."""
    path = tmp_path / "q.db"
    store = await Store.open(path)
    stub = GatedDeliverer()
    cfg = _cfg(max_connections=4, reserved_connections=0, max_connections_per_domain=2,
               initial_connections_per_domain=2)
    slow = [await _enqueue(store, [f"u{i}@one.slow.test"]) for i in range(10)]
    sched = Scheduler(store, stub, cfg, hostname="relay.test")  # type: ignore[arg-type]
    await sched.start()
    try:
        await _until(lambda: stub.active.get("one.slow.test") == 2, stub.changed)
        new = [await _enqueue(store, [f"b{i}@new.test"]) for i in range(3)]
        await _wait_all_delivered(store, new)
        assert stub.active["one.slow.test"] == 2  # never more than its limit at once
        leased = [r for m in [await store.get_message(i) for i in slow]
                  for r in m.recipients if r.lease_owner]
        assert len(leased) == 2  # and nothing else of it claimed meanwhile
    finally:
        stub.gate.set()
        await sched.stop()
        await store.close()


async def test_a_dead_destination_is_deferred_without_connections_then_probed(
        tmp_path: Path) -> None:
    events: list[tuple[str, dict[str, Any]]] = []
    logged = asyncio.Event()

    def observe(name: str, fields: dict[str, Any]) -> None:
        events.append((name, dict(fields)))
        logged.set()

    now = [1000.0]
    path = tmp_path / "q.db"
    store = await Store.open(path)
    stub = GatedDeliverer()
    cfg = _cfg(initial_connections_per_domain=2, retry_schedule=["60s"],
               dead_destination_time="20s")
    ids = [await store.enqueue(Envelope("a@example.org", (f"u{i}@x.dead.test",),
                                        b"Subject: x\r\n\r\nhi\r\n"), now=now[0])
           for i in range(30)]
    sched = Scheduler(store, stub, cfg, hostname="relay.test",  # type: ignore[arg-type]
                      clock=lambda: now[0])
    log.observers.append(observe)
    await sched.start()
    try:
        deferred = lambda: sum(1 for n, _ in events if n == "deferred")  # noqa: E731
        await _until(lambda: deferred() == 30, logged)
        # the window was 2: two connections failed, then the destination was dead
        assert len(stub.calls) == 2
        dead = [f for n, f in events if n == "destination_dead"]
        assert len(dead) == 1 and dead[0]["domain"] == "x.dead.test"
        assert dead[0]["code"] == "4.4.1" and dead[0]["failures"] == 2
        async with asyncio.timeout(20):  # the events come as the outcomes are built,
            while True:                   # just before their write commits
                infos = [await store.get_message(i) for i in ids]
                rcpts = [r for m in infos for r in m.recipients]
                if all(r.status.value != "queued" for r in rcpts):
                    break
                await asyncio.sleep(0.01)
        assert all(r.status.value == "deferred" and r.attempts == 1 and r.code == "4.4.1"
                   for r in rcpts)
        suspended = [r for r in rcpts if r.reply.startswith("delivery temporarily suspended: ")]
        assert len(suspended) == 28 and all("timeout after 30s" in r.reply for r in suspended)
        # their next attempt is the first plan point after the dead time (1000 + 60)
        assert {r.next_attempt_at for r in rcpts} == {1060.0}
        assert all(r.history and r.history[-1].reply == r.reply for r in suspended)
        # the next plan point: one connection probes it, it answers, the rest follows
        stub.failing = False
        now[0] = 1060.5
        store.new_work.set()
        await _wait_all_delivered(store, ids, within=30)
        assert sum(1 for n, _ in events if n == "destination_recovered") == 1
        assert len(stub.calls) == 2 + 30
    finally:
        log.observers.remove(observe)
        await sched.stop()
        await store.close()
