"""The queue store's contract: what every backend promises, run against SQLite and a
real PostgreSQL (tests/support/stores.py). Intake durability and group commit, claims
and leases, outcomes and trace, operator views."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from relay.errors import CorruptMessage, NotFound, StorageUnavailable, StoreError
from relay.model import RecipientStatus as S
from relay.store import AttemptTrace, JobResult, RecipientUpdate, Store
from tests.support.envelopes import BODY, ISO, T0, env
from tests.support.stores import (
    BACKENDS,
    StoreClock,
    open_backend,
    pg_server_fixture,
    raw,
    store_fixture,
)

pg_server = pg_server_fixture()
store = store_fixture()


@pytest.fixture
def clock(store: Store) -> StoreClock:
    # PostgreSQL judges leases by its own clock: start near it
    import time

    return StoreClock("pg" if store.backend.kind == "postgresql" else "sqlite",
                      time.time() if store.backend.kind == "postgresql" else T0)


def reopener(store: Store) -> Callable[[], Awaitable[Store]]:
    if store.backend.kind == "postgresql":
        url = store.backend.dialect.url  # type: ignore[attr-defined]
        return lambda: Store.open_url(url)
    path = store.path
    assert path is not None
    return lambda: Store.open(path)


async def test_enqueue_is_durable_when_it_returns(store: Store) -> None:
    qid = await store.enqueue(env("Bob@Example.NET", "carol@bücher.example"), now=T0)
    # a second, independent connection sees the committed row at once
    got = await raw(store, "SELECT id, sender, received_at, size FROM messages")
    assert got == [(qid, "alice@example.org", T0, len(BODY))]
    rcpts = await raw(store, "SELECT address, domain, status, attempts, next_attempt_at "
                             "FROM recipients ORDER BY id")
    assert rcpts == [("Bob@Example.NET", "example.net", "queued", 0, T0),
                     ("carol@bücher.example", "xn--bcher-kva.example", "queued", 0, T0)]
    assert await store.load_body(qid) == BODY
    assert await store.load_headers(qid) == b"From: a@example.org\r\nSubject: test\r\n"


@pytest.mark.parametrize("kind", BACKENDS)
async def test_group_commit_groups_concurrent_enqueues(
        kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    store = await open_backend(kind, tmp_path, request, commit_batch=512)
    try:
        before = store.commits
        ids = await asyncio.gather(
            *(store.enqueue(env(f"r{i}@example.net"), now=T0) for i in range(300)))
        commits = store.commits - before
        assert len(set(ids)) == 300
        assert 1 <= commits <= 10, commits  # 300 messages, a handful of fsyncs
        assert await raw(store, "SELECT count(*) FROM messages") == [(300,)]
    finally:
        await store.close()


@pytest.mark.parametrize("kind", BACKENDS)
async def test_commit_batch_caps_a_transaction(
        kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    store = await open_backend(kind, tmp_path, request, commit_batch=10)
    try:
        await asyncio.gather(*(store.enqueue(env(f"r{i}@example.net"), now=T0)
                               for i in range(100)))
        assert store.commits >= 10
    finally:
        await store.close()


async def test_new_work_is_set_after_commit(store: Store) -> None:
    assert not store.new_work.is_set()
    await store.enqueue(env("bob@example.net"), now=T0)
    assert store.new_work.is_set()


async def test_enqueue_needs_a_recipient(store: Store) -> None:
    with pytest.raises(StoreError):
        await store.enqueue(env(), now=T0)


@pytest.mark.parametrize("kind", BACKENDS)
async def test_close_finishes_pending_enqueues(
        kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    store = await open_backend(kind, tmp_path, request)
    tasks = [asyncio.ensure_future(store.enqueue(env("b@example.net"), now=T0))
             for _ in range(20)]
    await asyncio.sleep(0)
    reopen = reopener(store)
    await store.close()
    ids = await asyncio.gather(*tasks)
    with pytest.raises(StorageUnavailable):
        await store.enqueue(env("b@example.net"), now=T0)
    store = await reopen()
    try:
        assert len(await raw(store, "SELECT id FROM messages")) == len(set(ids)) == 20
    finally:
        await store.close()


async def test_claim_groups_per_message_and_domain(store: Store) -> None:
    qid = await store.enqueue(
        env("a@one.example", "B@ONE.example", "c@two.example"), now=T0)
    jobs = await store.claim(now=T0, owner="w1", lease_seconds=60, limit=10)
    assert {(j.message_id, j.domain, tuple(r[1] for r in j.recipients)) for j in jobs} == {
        (qid, "one.example", ("a@one.example", "B@ONE.example")),
        (qid, "two.example", ("c@two.example",)),
    }
    job = jobs[0]
    assert job.sender == "alice@example.org" and job.size == len(BODY)
    assert job.received_at == T0 and job.smtputf8 is False
    assert all(r[2] == 0 for j in jobs for r in j.recipients)
    # leased: nobody else gets them while the lease runs
    assert await store.claim(now=T0 + 59, owner="w2", lease_seconds=60, limit=10) == []


async def test_claim_splits_by_max_recipients_and_respects_limit(store: Store) -> None:
    await store.enqueue(env(*(f"r{i}@one.example" for i in range(5))), now=T0)
    for i in range(3):
        await store.enqueue(env(f"x@d{i}.example"), now=T0 + 1 + i)
    jobs = await store.claim(now=T0 + 10, owner="w", lease_seconds=60, limit=2,
                             max_recipients=2)
    assert [len(j.recipients) for j in jobs] == [2, 2, 1, 1]  # 2 groups, the first split
    rest = await store.claim(now=T0 + 10, owner="w", lease_seconds=60, limit=10)
    assert len(rest) == 2


async def test_expired_lease_returns_to_the_queue(store: Store, clock: StoreClock) -> None:
    qid = await store.enqueue(env("bob@example.net"), now=clock.now)
    lease = 1.0
    (job,) = await store.claim(now=clock.now, owner="crashed", lease_seconds=lease, limit=5)
    nxt = await store.next_due(clock.now)  # the lease's end (the database's, on PostgreSQL)
    assert nxt is not None and clock.now < nxt <= clock.now + lease + 1
    assert await store.claim(now=clock.now, owner="w2", lease_seconds=lease, limit=5) == []
    await clock.lease_passes(lease)
    (again,) = await store.claim(now=clock.now, owner="w2", lease_seconds=30, limit=5)
    assert again.message_id == qid and again.recipients == job.recipients
    info = await store.get_message(qid)
    assert info.recipients[0].lease_owner == "w2"


async def test_unlease_gives_work_back(store: Store) -> None:
    await store.enqueue(env("bob@example.net"), now=T0)
    await store.claim(now=T0, owner="w1", lease_seconds=600, limit=5)
    assert await store.unlease("other") == 0
    assert await store.unlease("w1") == 1
    assert len(await store.claim(now=T0, owner="w2", lease_seconds=600, limit=5)) == 1


async def test_held_messages_are_skipped(store: Store) -> None:
    held = await store.enqueue(env("bob@example.net"), now=T0)
    other = await store.enqueue(env("carol@example.net"), now=T0)
    assert await store.hold(held)
    jobs = await store.claim(now=T0, owner="w", lease_seconds=60, limit=10)
    assert [j.message_id for j in jobs] == [other]
    assert await store.next_due(T0) is not None  # `other` is leased; its lease end
    store.new_work.clear()
    assert await store.release(held)
    assert store.new_work.is_set()
    assert [j.message_id for j in await store.claim(now=T0, owner="w", lease_seconds=60,
                                                    limit=10)] == [held]
    assert not await store.hold("0000000000000000")
    assert not await store.release("0000000000000000")


async def test_fair_between_new_and_deferred_mail(store: Store) -> None:
    deferred = []
    for i in range(20):  # a backlog of retries, all due before the new mail arrived
        qid = await store.enqueue(env(f"old{i}@slow.example"), now=T0 + i)
        deferred.append(qid)
    jobs = await store.claim(now=T0 + 100, owner="w", lease_seconds=1, limit=20)
    await store.record([JobResult(j.message_id, tuple(
        RecipientUpdate(r[0], S.DEFERRED, "4.4.1", "timeout", next_attempt_at=T0 + 200)
        for r in j.recipients)) for j in jobs], now=T0 + 100)
    fresh = [await store.enqueue(env(f"new{i}@fast.example"), now=T0 + 300 + i)
             for i in range(20)]
    jobs = await store.claim(now=T0 + 400, owner="w", lease_seconds=60, limit=10)
    kinds = ["new" if j.message_id in fresh else "old" for j in jobs]
    assert kinds == ["new", "old"] * 5
    # each kind oldest first
    assert [j.message_id for j in jobs if j.message_id in fresh] == fresh[:5]
    assert [j.message_id for j in jobs if j.message_id in deferred] == deferred[:5]


async def test_claim_respects_per_domain_caps(store: Store) -> None:
    """Issue 14: the claim hands out nothing for a domain at its limit, at most its free
    count for a domain with state, `initial` for the others."""
    for i in range(4):
        await store.enqueue(env(f"a{i}@full.example"), now=T0 + i)
        await store.enqueue(env(f"b{i}@one.example"), now=T0 + i)
        await store.enqueue(env(f"c{i}@new.example"), now=T0 + i)
    jobs = await store.claim(now=T0 + 10, owner="w", lease_seconds=60, limit=10,
                             caps={"full.example": 0, "one.example": 1}, initial=2)
    got = sorted(j.domain for j in jobs)
    assert got == ["new.example", "new.example", "one.example"]
    # oldest first within a domain
    assert [j.recipients[0][1] for j in jobs if j.domain == "new.example"] == \
        ["c0@new.example", "c1@new.example"]
    # the rest stays due, unclaimed
    rest = await store.claim(now=T0 + 10, owner="w", lease_seconds=60, limit=20)
    assert sorted(j.domain for j in rest).count("full.example") == 4
    assert len(rest) == 4 + 3 + 2


async def test_claim_hands_out_dead_domains_beyond_the_limit(store: Store) -> None:
    for i in range(5):
        await store.enqueue(env(f"x{i}@dead.example"), now=T0 + i)
        await store.enqueue(env(f"y{i}@live.example"), now=T0 + i)
    jobs = await store.claim(now=T0 + 10, owner="w", lease_seconds=60, limit=2,
                             caps={"dead.example": -1}, dead_limit=3)
    got = sorted(j.domain for j in jobs)
    assert got == ["dead.example"] * 3 + ["live.example"] * 2
    # no dead work handed out without dead_limit
    jobs = await store.claim(now=T0 + 10, owner="w", lease_seconds=60, limit=5,
                             caps={"dead.example": -1})
    assert sorted(j.domain for j in jobs) == ["live.example"] * 3


async def test_claim_keeps_slots_for_new_mail(store: Store) -> None:
    """`retry_limit`: at most so many jobs of deferred mail; new mail may take the rest."""
    old = [await store.enqueue(env(f"o{i}@slow.example"), now=T0 + i) for i in range(6)]
    jobs = await store.claim(now=T0 + 10, owner="w", lease_seconds=1, limit=10)
    await store.record([JobResult(j.message_id, tuple(
        RecipientUpdate(r[0], S.DEFERRED, "4.4.1", "timeout", next_attempt_at=T0 + 20)
        for r in j.recipients)) for j in jobs], now=T0 + 10)
    new = [await store.enqueue(env(f"n{i}@fast.example"), now=T0 + 30 + i) for i in range(6)]
    jobs = await store.claim(now=T0 + 40, owner="w", lease_seconds=60, limit=6,
                             retry_limit=2)
    assert sorted(j.message_id for j in jobs if not j.fresh) == old[:2]
    assert sorted(j.message_id for j in jobs if j.fresh) == new[:4]
    assert all(j.fresh == (j.message_id in new) for j in jobs)


async def test_claim_brings_small_bodies_along(store: Store) -> None:
    small = await store.enqueue(env("a@one.example"), now=T0)
    big = await store.enqueue(env("b@two.example", body=BODY * 4), now=T0)
    jobs = {j.message_id: j for j in await store.claim(
        now=T0, owner="w", lease_seconds=60, limit=10, inline_body=len(BODY))}
    assert jobs[small].body == BODY and jobs[big].body is None
    assert await store.job_body(jobs[small]) == BODY
    assert await store.job_body(jobs[big]) == BODY * 4  # read now
    # a body that no longer matches its digest is refused as load_body refuses it
    bad = await store.enqueue(env("c@three.example"), now=T0)
    (job,) = await store.claim(now=T0, owner="w", lease_seconds=60, limit=10,
                               inline_body=len(BODY))
    from dataclasses import replace

    with pytest.raises(CorruptMessage):
        await store.job_body(replace(job, body=BODY[:-3] + b"yy\n"))
    assert job.message_id == bad


async def test_renew_leases_says_which_rows_are_still_ours(store: Store) -> None:
    await store.enqueue(env("a@one.example", "b@two.example"), now=T0)
    jobs = await store.claim(now=T0, owner="w", lease_seconds=60, limit=10)
    ids = [r[0] for j in jobs for r in j.recipients]
    assert await store.renew_leases("w", ids, now=T0 + 10, lease=60) == set(ids)
    assert await store.renew_leases("other", ids, now=T0 + 10, lease=60) == set()
    await store.record([JobResult(jobs[0].message_id, (RecipientUpdate(
        jobs[0].recipients[0][0], S.DELIVERED, "2.0.0"),))], now=T0 + 11, owner="w")
    assert await store.renew_leases("w", ids, now=T0 + 12, lease=60) == set(ids[1:])


async def test_concurrent_records_share_one_transaction(store: Store) -> None:
    """Outcomes of jobs finishing together are written together (one commit, one
    statement per kind), and each caller returns only after that commit."""
    for i in range(20):
        await store.enqueue(env(f"r{i}@d{i}.example"), now=T0)
    jobs = await store.claim(now=T0, owner="w", lease_seconds=60, limit=20)
    before = store.commits
    await asyncio.gather(*(store.record([JobResult(j.message_id, (RecipientUpdate(
        j.recipients[0][0], S.DELIVERED, "2.0.0", "250 ok"),), (AttemptTrace(
            j.recipients[0][0], T0 + 1, code="2.0.0"),))], now=T0 + 1, owner="w")
        for j in jobs))
    assert store.commits - before <= 2
    done = await raw(store, "SELECT count(*) FROM recipients WHERE status = 'delivered'")
    assert done == [(20,)]
    assert await raw(store, "SELECT count(*) FROM attempts") == [(20,)]
    assert await raw(store, "SELECT count(*) FROM messages WHERE finished_at IS NULL") == \
        [(0,)]


async def test_record_outcomes_trace_and_body_drop(store: Store) -> None:
    qid = await store.enqueue(env("ok@a.example", "bad@a.example", "later@b.example"), now=T0)
    jobs = {j.domain: j for j in await store.claim(now=T0, owner="w", lease_seconds=60,
                                                   limit=10)}
    (ok_id, _, _), (bad_id, _, _) = jobs["a.example"].recipients
    ((later_id, _, _),) = jobs["b.example"].recipients
    trace = dict(mx="mx.a.example", ip="192.0.2.1", dnssec="secure", tlsa="3 1 1 ab12",
                 tls="TLSv1.3 TLS_AES_256_GCM_SHA384", dane="authenticated (3 1 1)")
    await store.record([
        JobResult(qid,
                  (RecipientUpdate(ok_id, S.DELIVERED, "2.0.0", "250 2.0.0 Ok"),
                   RecipientUpdate(bad_id, S.BOUNCED, "5.1.1", "550 5.1.1 no such user",
                                   ndr_state="pending")),
                  (AttemptTrace(ok_id, T0 + 1, code="2.0.0", reply="250 2.0.0 Ok", **trace),
                   AttemptTrace(bad_id, T0 + 1, code="5.1.1", reply="550 5.1.1 no such user",
                                **trace))),
        JobResult(qid, (RecipientUpdate(later_id, S.DEFERRED, "4.7.323", "tlsa-invalid",
                                        next_attempt_at=T0 + 901),),
                  (AttemptTrace(later_id, T0 + 1, mx="mx.b.example", code="4.7.323"),)),
    ], now=T0 + 1)
    info = await store.get_message(qid)
    by = {r.address: r for r in info.recipients}
    assert by["ok@a.example"].status is S.DELIVERED and by["ok@a.example"].attempts == 1
    assert by["bad@a.example"].code == "5.1.1" and by["bad@a.example"].ndr_state == "pending"
    assert by["later@b.example"].next_attempt_at == T0 + 901
    assert all(r.lease_owner is None and r.leased_until is None for r in info.recipients)
    assert [a.mx for a in by["ok@a.example"].history] == ["mx.a.example"]
    assert by["ok@a.example"].history[0].dane == "authenticated (3 1 1)"
    assert info.finished_at is None and await store.load_body(qid) == BODY
    assert await store.next_due(T0 + 1) == T0 + 901

    (job,) = await store.claim(now=T0 + 901, owner="w", lease_seconds=60, limit=10)
    assert job.recipients == ((later_id, "later@b.example", 1),)
    await store.record([JobResult(qid, (RecipientUpdate(later_id, S.DELIVERED, "2.0.0"),))],
                       now=T0 + 902)
    info = await store.get_message(qid)
    assert info.finished_at == T0 + 902 and not info.has_body
    with pytest.raises(NotFound):
        await store.load_body(qid)
    assert await store.load_headers(qid) == b"From: a@example.org\r\nSubject: test\r\n"
    assert await store.next_due(T0 + 902) is None
    # a late result for a final recipient (lease expired, done twice) changes nothing
    await store.record([JobResult(qid, (RecipientUpdate(ok_id, S.DEFERRED, "4.4.1"),))],
                       now=T0 + 903)
    assert (await store.get_message(qid)).recipients[0].status is S.DELIVERED


async def test_record_after_delete_is_harmless(store: Store) -> None:
    qid = await store.enqueue(env("bob@example.net"), now=T0)
    (job,) = await store.claim(now=T0, owner="w", lease_seconds=60, limit=1)
    assert await store.delete(qid)
    rid = job.recipients[0][0]
    await store.record([JobResult(qid, (RecipientUpdate(rid, S.DELIVERED, "2.0.0"),),
                                  (AttemptTrace(rid, T0, code="2.0.0"),))], now=T0)
    assert await raw(store, "SELECT count(*) FROM attempts") == [(0,)]
    assert not await store.delete(qid)


async def test_retry_makes_deferred_work_due(store: Store) -> None:
    a = await store.enqueue(env("x@a.example"), now=T0)
    b = await store.enqueue(env("y@b.example"), now=T0)
    jobs = await store.claim(now=T0, owner="w", lease_seconds=60, limit=10)
    await store.record([JobResult(j.message_id, (RecipientUpdate(
        j.recipients[0][0], S.DEFERRED, "4.4.312", "DNS query failed",
        next_attempt_at=T0 + 900),)) for j in jobs], now=T0 + 1)
    assert await store.claim(now=T0 + 2, owner="w", lease_seconds=60, limit=10) == []
    store.new_work.clear()
    assert await store.retry(a, now=T0 + 2) == 1
    assert store.new_work.is_set()
    assert [j.message_id for j in await store.claim(
        now=T0 + 2, owner="w", lease_seconds=60, limit=10)] == [a]
    assert await store.retry(None, now=T0 + 3) == 1  # a is leased now: left alone
    assert [j.message_id for j in await store.claim(
        now=T0 + 3, owner="w", lease_seconds=60, limit=10)] == [b]
    with pytest.raises(NotFound):
        await store.retry("0000000000000000", now=T0)


async def test_delete_removes_message_recipients_and_trace(store: Store) -> None:
    qid = await store.enqueue(env("x@a.example", "y@a.example"), now=T0)
    (job,) = await store.claim(now=T0, owner="w", lease_seconds=60, limit=10)
    await store.record([JobResult(qid, (), (AttemptTrace(job.recipients[0][0], T0),))],
                       now=T0)
    assert await store.delete(qid)
    for table in ("messages", "recipients", "attempts"):
        assert await raw(store, f"SELECT count(*) FROM {table}") == [(0,)]
    with pytest.raises(NotFound):
        await store.get_message(qid)


async def test_purge_keeps_trace_until_retention(store: Store) -> None:
    done_old = await store.enqueue(env("x@a.example"), now=T0)
    done_new = await store.enqueue(env("y@a.example"), now=T0)
    active = await store.enqueue(env("z@b.example"), now=T0)
    jobs = {j.message_id: j for j in await store.claim(now=T0, owner="w", lease_seconds=60,
                                                       limit=10)}
    await store.record([JobResult(done_old, (RecipientUpdate(
        jobs[done_old].recipients[0][0], S.DELIVERED, "2.0.0"),))], now=T0 + 10)
    await store.record([JobResult(done_new, (RecipientUpdate(
        jobs[done_new].recipients[0][0], S.BOUNCED, "5.1.1"),))], now=T0 + 5000)
    week = 7 * 86400
    assert await store.purge(now=T0 + 10 + week - 1, retention=week) == 0
    assert await store.purge(now=T0 + 10 + week, retention=week) == 1
    remaining = {m.id for m in await store.list_messages(include_final=True)}
    assert remaining == {done_new, active}
    assert await store.purge(now=T0 + 10**8, retention=week) == 1  # never the active one
    assert {m.id for m in await store.list_messages(include_final=True)} == {active}


async def test_list_filters(store: Store) -> None:
    a = await store.enqueue(env("one@Dest.Example", sender="s1@org.example"), now=T0)
    b = await store.enqueue(env("two@bücher.example", sender="s2@org.example"), now=T0 + 1)
    c = await store.enqueue(env("three@other.example", sender="S1@org.example"), now=T0 + 2)
    jobs = {j.message_id: j for j in await store.claim(now=T0 + 5, owner="w",
                                                       lease_seconds=60, limit=10)}
    await store.record([
        JobResult(a, (RecipientUpdate(jobs[a].recipients[0][0], S.DEFERRED, "4.7.323",
                                      next_attempt_at=T0 + 900),)),
        JobResult(c, (RecipientUpdate(jobs[c].recipients[0][0], S.DELIVERED, "2.0.0"),)),
    ], now=T0 + 6)

    async def ids(**kw: object) -> list[str]:
        return [m.id for m in await store.list_messages(**kw)]  # type: ignore[arg-type]

    assert await ids() == [a, b]
    assert await ids(include_final=True) == [a, b, c]
    assert await ids(status="deferred") == [a]
    assert await ids(status="queued") == [b]
    assert await ids(domain="DEST.example") == [a]
    assert await ids(domain="bücher.example") == [b]
    assert await ids(code="4.7.323") == [a]
    assert await ids(sender="s1@org.example") == [a]
    assert await ids(sender="s1@org.example", include_final=True) == [a, c]
    assert await ids(recipient="TWO@bücher.example") == [b]
    assert await ids(status="delivered") == []
    assert await ids(status="delivered", include_final=True) == [c]


async def test_json_shapes(store: Store) -> None:
    qid = await store.enqueue(env("x@a.example"), now=T0)
    (job,) = await store.claim(now=T0, owner="w", lease_seconds=60, limit=1)
    rid = job.recipients[0][0]
    await store.record([JobResult(qid, (RecipientUpdate(
        rid, S.DEFERRED, "4.7.323", "tlsa-invalid: The domain failed DANE validation.",
        next_attempt_at=T0 + 900),), (AttemptTrace(
            rid, T0 + 1, mx="mx.a.example", ip="192.0.2.1", dnssec="secure", tlsa="3 1 1 00",
            tls="TLSv1.3", dane="no match", code="4.7.323", reply="-", policy="dane"),))],
        now=T0 + 1)
    (summary,) = [m.summary_json() for m in await store.list_messages()]
    assert set(summary) >= {"id", "sender", "received_at", "size", "recipients", "held"}
    assert summary["id"] == qid and ISO.match(summary["received_at"])
    assert summary["received_at"] == "2026-11-18T11:06:40Z"
    assert summary["recipients"] == [{"address": "x@a.example", "status": "deferred",
                                      "code": "4.7.323"}]
    detail = (await store.get_message(qid)).detail_json()
    assert set(detail) >= {"id", "sender", "received_at", "size", "recipients", "held"}
    (r,) = detail["recipients"]
    assert set(r) >= {"address", "status", "attempts", "next_attempt_at", "code", "reply",
                      "history"}
    assert r["attempts"] == 1 and ISO.match(r["next_attempt_at"])
    (h,) = r["history"]
    assert set(h) == {"at", "mx", "ip", "dnssec", "tlsa", "tls", "dane", "code", "reply",
                      "policy"}
    assert ISO.match(h["at"]) and h["code"] == "4.7.323" and h["mx"] == "mx.a.example"
    assert h["policy"] == "dane"


async def test_stats(store: Store) -> None:
    for i in range(3):
        await store.enqueue(env(f"x{i}@slow.example", f"y{i}@fast.example"), now=T0 + i)
    jobs = await store.claim(now=T0 + 10, owner="w", lease_seconds=60, limit=10)
    await store.record([JobResult(j.message_id, tuple(
        RecipientUpdate(r[0], S.DEFERRED, "4.7.323", next_attempt_at=T0 + 900)
        if j.domain == "slow.example" else RecipientUpdate(r[0], S.DELIVERED, "2.0.0")
        for r in j.recipients)) for j in jobs], now=T0 + 10)
    await store.hold(jobs[0].message_id)
    st = await store.stats(now=T0 + 100)
    assert st.messages == 3 and st.held == 1 and st.finished == 0
    assert st.by_status == {"deferred": 3, "delivered": 3}
    assert ("4.7.323", "deferred", 3) in st.by_code and ("2.0.0", "delivered", 3) in st.by_code
    assert st.oldest_age == 100
    assert st.top_deferred_domains == (("slow.example", 3),)
    assert st.as_json()["recipients"] == {"queued": 0, "deferred": 3, "delivered": 3,
                                          "bounced": 0}


@pytest.mark.parametrize("kind", BACKENDS)
async def test_bodies_survive_reopen_byte_for_byte(
        kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    store = await open_backend(kind, tmp_path, request)
    reopen = reopener(store)
    bodies = {}
    for i in range(20):
        body = b"Subject: %d\r\n\r\n" % i + os.urandom(3000)
        bodies[await store.enqueue(env("b@a.example", body=body), now=T0)] = body
    await store.close()
    store = await reopen()
    try:
        for qid, body in bodies.items():
            got = await store.load_body(qid)
            assert hashlib.sha256(got).digest() == hashlib.sha256(body).digest()
    finally:
        await store.close()


def test_both_backends_define_the_same_queries() -> None:
    from relay.store.sqlfiles import queries

    # the shared code uses the same names; the PostgreSQL dialect's insert also writes the
    # body into its own table
    assert set(queries("sqlite")) == set(queries("pg")) - {"insert_body"}


async def test_mta_sts_policy_cache(store: Store) -> None:
    assert await store.sts_get("example.net") is None
    await store.sts_fail("example.net", policy_id="1", failure="404",
                         failure_type="sts-policy-fetch-error", now=T0)
    row = await store.sts_get("example.net")
    assert row is not None and row.policy == "" and row.failure_type.startswith("sts-")
    await store.sts_put("example.net", policy_id="2", policy="version: STSv1\n",
                        mode="enforce", max_age=86400, now=T0 + 1)
    row = await store.sts_get("example.net")
    assert row is not None and (row.policy_id, row.expires_at, row.failure) == (
        "2", T0 + 1 + 86400, "")
    # a failed refetch keeps the cached policy (RFC 8461 §5.1)
    await store.sts_fail("example.net", policy_id="3", failure="timeout",
                         failure_type="sts-policy-fetch-error", now=T0 + 2)
    row = await store.sts_get("example.net")
    assert row is not None and row.policy_id == "2" and row.failed_id == "3"
    assert await store.sts_due(now=T0 + 86400 - 60, checked_before=T0,
                               refresh_before=3600) == ["example.net"]
    assert await store.sts_due(now=T0 + 10, checked_before=T0, refresh_before=3600) == []
    assert [r.domain for r in await store.sts_list()] == ["example.net"]


async def test_nodes_are_listed_with_how_long_ago_they_were_seen(store: Store) -> None:
    # `relay queue nodes`: a heartbeat, then the list (PostgreSQL stamps seen_at with its
    # own clock and computes the age with it too; the age is a plain float either way)
    import time

    now = time.time()
    await store.node_seen("n1/abc", "n1", started_at=now - 5, now=now)
    [node] = await store.nodes(now=now + 2)
    assert (node["owner"], node["node"], node["started_at"]) == ("n1/abc", "n1", now - 5)
    assert type(node["seen_ago"]) is float and 0 <= node["seen_ago"] < 60, node
    assert await store.forget_nodes(before=node["seen_at"] + 1) == 1
    assert await store.nodes(now=now) == []


# --- a deep queue: pages, counts, batches (issue 14) ---------------------------------


async def _mixed_queue(store: Store) -> dict[str, str]:
    """Six messages in every state a listing distinguishes; returns name -> queue id."""
    ids = {
        "queued": await store.enqueue(env("q@a.example"), now=T0),
        "deferred": await store.enqueue(env("d1@b.example", "d2@c.example"), now=T0 + 1),
        "partial": await store.enqueue(env("p1@a.example", "p2@b.example"), now=T0 + 2),
        "delivered": await store.enqueue(env("x@a.example", sender="Other@Org.Example"),
                                         now=T0 + 3),
        "held": await store.enqueue(env("h@b.example"), now=T0 + 4),
        "last": await store.enqueue(env("l@c.example", sender="other@org.example"),
                                    now=T0 + 5),
    }
    jobs = await store.claim(now=T0 + 10, owner="w", lease_seconds=60, limit=50)
    results = []
    for j in jobs:
        ups = []
        for rid, address, _ in j.recipients:
            if address.startswith(("d1", "d2", "p2")):
                ups.append(RecipientUpdate(rid, S.DEFERRED, "4.7.323" if address != "d2@c.example"
                                           else "4.4.1", next_attempt_at=T0 + 900))
            elif address.startswith(("p1", "x@")):
                ups.append(RecipientUpdate(rid, S.DELIVERED, "2.0.0", "250 ok"))
        results.append(JobResult(j.message_id, tuple(ups)))
    await store.record(results, now=T0 + 11)
    await store.unlease("w")
    await store.hold(ids["held"])
    return ids


async def test_list_pages_follow_the_cursor(store: Store) -> None:
    ids = await _mixed_queue(store)
    open_ids = [ids[k] for k in ("queued", "deferred", "partial", "held", "last")]
    assert [m.id for m in await store.list_messages()] == open_ids
    pages, after = [], ""
    while True:
        page = await store.list_page(after=after, limit=2)
        if not page:
            break
        pages.append([m.id for m in page])
        after = page[-1].id
    assert pages == [open_ids[0:2], open_ids[2:4], open_ids[4:]]
    every = sorted(ids.values())
    assert [m.id for m in await store.list_page(limit=100, include_final=True)] == every
    assert [m.id for m in await store.list_page(after=every[2], limit=2,
                                                include_final=True)] == every[3:5]
    # a page is whole messages with all their recipients
    (partial,) = await store.list_page(after=ids["deferred"], limit=1)
    assert partial.id == ids["partial"]
    assert [(r.address, str(r.status), r.code) for r in partial.recipients] == [
        ("p1@a.example", "delivered", "2.0.0"), ("p2@b.example", "deferred", "4.7.323")]
    # iter_messages: a limit across pages, and the rest after a cursor
    got = [m.id async for m in store.iter_messages(limit=3, page=2)]
    assert got == open_ids[:3]
    assert [m.id async for m in store.iter_messages(after=got[-1], page=2)] == open_ids[3:]
    assert await store.list_page(after=open_ids[-1], limit=5) == []


async def test_list_filters_on_every_page(store: Store) -> None:
    ids = await _mixed_queue(store)

    async def pages(**kw: object) -> list[str]:
        out, after = [], ""
        while True:
            page = await store.list_page(after=after, limit=1, **kw)  # type: ignore[arg-type]
            if not page:
                return out
            out += [m.id for m in page]
            after = page[-1].id

    # any recipient may match (a message with work left whose matching recipient is
    # final is listed too: the partial message for its delivered a.example recipient)
    assert await pages(domain="A.example") == [ids["queued"], ids["partial"]]
    assert await pages(domain="a.example", include_final=True) == [
        ids["queued"], ids["partial"], ids["delivered"]]
    assert await pages(status="delivered") == [ids["partial"]]
    assert await pages(status="delivered", include_final=True) == [
        ids["partial"], ids["delivered"]]
    assert await pages(status="deferred", code="4.4.1") == [ids["deferred"]]
    assert await pages(code="4.7.323") == [ids["deferred"], ids["partial"]]
    assert await pages(domain="b.example", status="deferred") == [
        ids["deferred"], ids["partial"]]
    assert await pages(recipient="P2@B.EXAMPLE") == [ids["partial"]]
    assert await pages(sender="other@org.example") == [ids["last"]]
    assert await pages(sender="OTHER@org.example", include_final=True) == [
        ids["delivered"], ids["last"]]
    assert await pages(sender="other@org.example", domain="c.example") == [ids["last"]]
    assert await pages(domain="nowhere.example") == []


COUNTS_SQL = {
    "by_status": "SELECT status, count(*) FROM recipients GROUP BY status",
    "by_code": "SELECT code, status, count(*) FROM recipients WHERE code != '' "
               "GROUP BY code, status",
    "messages": "SELECT count(*), coalesce(sum(size), 0) FROM messages m WHERE EXISTS "
                "(SELECT 1 FROM recipients r WHERE r.message_id = m.id "
                "AND r.status IN ('queued', 'deferred'))",
    "held": "SELECT count(*) FROM messages WHERE held != 0 AND finished_at IS NULL",
    "finished": "SELECT count(*) FROM messages WHERE finished_at IS NOT NULL",
    "domains": "SELECT domain, count(*) FROM recipients WHERE status = 'deferred' "
               "GROUP BY domain",
    "oldest": "SELECT min(m.received_at) FROM messages m WHERE EXISTS (SELECT 1 FROM "
              "recipients r WHERE r.message_id = m.id AND r.status IN ('queued', 'deferred'))",
}


async def assert_stats_match_the_queue(store: Store, now: float) -> None:
    """`stats()` (kept counts on SQLite, aggregates on PostgreSQL) equals a full count."""
    st = await store.stats(now=now, top=1000)
    counted = {k: await raw(store, sql) for k, sql in COUNTS_SQL.items()}
    assert st.by_status == {s: int(n) for s, n in counted["by_status"]}
    assert sorted(st.by_code) == sorted((c, s, int(n)) for c, s, n in counted["by_code"])
    (messages, octets), = counted["messages"]
    assert (st.messages, st.bytes) == (int(messages), int(octets))
    assert st.held == counted["held"][0][0]
    assert st.finished == counted["finished"][0][0]
    assert sorted(st.top_deferred_domains) == sorted(
        (d, int(n)) for d, n in counted["domains"])
    assert st.oldest_received_at == counted["oldest"][0][0]


async def test_stats_follow_every_kind_of_change(store: Store) -> None:
    await assert_stats_match_the_queue(store, T0)  # empty
    ids = await _mixed_queue(store)
    await assert_stats_match_the_queue(store, T0 + 20)
    # a code that changes while deferred, a deferral that becomes final, a bounce
    jobs = {j.message_id: j for j in await store.claim(now=T0 + 901, owner="w",
                                                       lease_seconds=60, limit=50)}
    dj = jobs[ids["deferred"]] if ids["deferred"] in jobs else None
    results = []
    for mid, j in jobs.items():
        ups = []
        for rid, address, _ in j.recipients:
            if address == "d1@b.example":
                ups.append(RecipientUpdate(rid, S.DEFERRED, "4.4.312",
                                           next_attempt_at=T0 + 2000))
            elif address == "d2@c.example":
                ups.append(RecipientUpdate(rid, S.BOUNCED, "5.4.1", ndr_state="pending"))
            elif address == "q@a.example":
                ups.append(RecipientUpdate(rid, S.DELIVERED, "2.0.0"))
        results.append(JobResult(mid, tuple(ups)))
    assert dj is not None
    await store.record(results, now=T0 + 902)
    await store.unlease("w")
    await assert_stats_match_the_queue(store, T0 + 903)
    await store.release(ids["held"])
    await store.hold(ids["partial"], reason="corrupt: test")
    await assert_stats_match_the_queue(store, T0 + 904)
    assert await store.delete(ids["partial"])  # held, with a delivered recipient
    assert await store.delete(ids["delivered"])  # finished
    await assert_stats_match_the_queue(store, T0 + 905)
    assert await store.retry(None, now=T0 + 906) >= 1  # no status changes
    await assert_stats_match_the_queue(store, T0 + 907)
    assert await store.purge(now=T0 + 10**7, retention=0) >= 1
    await assert_stats_match_the_queue(store, T0 + 10**7)
    st = await store.stats(now=T0 + 10**7)
    assert st.messages == 3 and st.held == 0 and st.finished == 0


async def test_retry_all_runs_in_short_batches(store: Store, monkeypatch: pytest.MonkeyPatch,
                                               clock: StoreClock) -> None:
    from relay.store import bulk

    monkeypatch.setattr(bulk, "BULK_BATCH", 4)
    monkeypatch.setattr(bulk, "BULK_BATCH_MAX", 4)
    monkeypatch.setattr(bulk, "PAUSE_MIN", 0.0)
    now = clock.now
    for i in range(9):
        await store.enqueue(env(f"r{i}a@a.example", f"r{i}b@b.example"), now=now)
    jobs = await store.claim(now=now, owner="w", lease_seconds=600, limit=50)
    await store.record([JobResult(j.message_id, tuple(
        RecipientUpdate(r[0], S.DEFERRED, "4.4.1", next_attempt_at=now + 3600)
        for r in j.recipients)) for j in jobs], now=now)
    leased = await store.claim(now=now + 3600, owner="w2", lease_seconds=600, limit=1)
    assert len(leased) == 1 and len(leased[0].recipients) == 1
    commits = store.commits
    store.new_work.clear()
    assert await store.retry(None, now=now + 1) == 17  # the leased recipient is left alone
    assert store.commits - commits >= 18 // 4  # 18 recipients, at most 4 per transaction
    assert store.new_work.is_set()
    due = await store.claim(now=now + 1, owner="w", lease_seconds=60, limit=50)
    assert sum(len(j.recipients) for j in due) == 17
    assert await store.retry(None, now=now + 2) == 0  # all leased now


async def test_purge_runs_in_short_batches(store: Store, monkeypatch: pytest.MonkeyPatch
                                           ) -> None:
    from relay.store import bulk

    monkeypatch.setattr(bulk, "BULK_BATCH", 8)  # one message per transaction (8 rows)
    monkeypatch.setattr(bulk, "BULK_BATCH_MAX", 8)
    monkeypatch.setattr(bulk, "PAUSE_MIN", 0.0)
    done = [await store.enqueue(env(f"x{i}@a.example"), now=T0) for i in range(5)]
    active = await store.enqueue(env("z@b.example"), now=T0)
    jobs = await store.claim(now=T0, owner="w", lease_seconds=60, limit=50)
    await store.record([JobResult(j.message_id, (RecipientUpdate(
        j.recipients[0][0], S.DELIVERED, "2.0.0"),)) for j in jobs
        if j.message_id in done], now=T0 + 1)
    commits = store.commits
    assert await store.purge(now=T0 + 100, retention=10) == 5
    assert store.commits - commits >= 5
    assert [m.id for m in await store.list_messages(include_final=True)] == [active]
    await assert_stats_match_the_queue(store, T0 + 100)


async def test_delay_warning_sweep_reads_by_arrival(store: Store) -> None:
    old = await store.enqueue(env("a@a.example"), now=T0)
    young = await store.enqueue(env("b@a.example"), now=T0 + 3600)
    jobs = await store.claim(now=T0 + 3600, owner="w", lease_seconds=60, limit=50)
    await store.record([JobResult(j.message_id, (RecipientUpdate(
        j.recipients[0][0], S.DEFERRED, "4.4.1", next_attempt_at=T0 + 9000),))
        for j in jobs], now=T0 + 3600)
    assert await store.pending_delay_warnings(before=T0 - 1) == []
    assert await store.pending_delay_warnings(before=T0 + 10) == [old]
    assert await store.pending_delay_warnings(before=T0 + 7200) == [old, young]
