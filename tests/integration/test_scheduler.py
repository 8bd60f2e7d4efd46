"""The scheduler against a real SQLite store: concurrency limits, surviving a locked
database, leases. The deliverer here is a stub that records what it is asked (delivery
itself is tested end to end in tests/e2e/test_delivery*.py)."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

from relay.config import build
from relay.dane.policy import DomainPlan, PlanAction
from relay.delivery.scheduler import Scheduler
from relay.delivery.trace import AttemptReport
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
        return AttemptReport({r: ok for r in recipients}, (), plan)

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
