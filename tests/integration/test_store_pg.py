"""The PostgreSQL backend where it differs from SQLite: several stores (nodes) on one
queue, the database's clock for leases, fenced writes, a server that goes away and
comes back. A real private server (tests/support/pgserver.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from relay.errors import StorageUnavailable
from relay.model import Envelope
from relay.model import RecipientStatus as S
from relay.store import AttemptTrace, JobResult, RecipientUpdate, Store
from relay.store.pg.conn import compile_named, rowcount
from relay.store.pg.schema import redact
from tests.support.pgserver import PgServer
from tests.support.stores import pg_server_fixture, raw

pg_server = pg_server_fixture()
BODY = b"Subject: t\r\n\r\nhello\r\n"


def env(*rcpts: str) -> Envelope:
    return Envelope(sender="a@example.org", recipients=rcpts, body=BODY)


@pytest.fixture
async def url(pg_server: PgServer, request: pytest.FixtureRequest) -> str:
    return pg_server.create_db(f"t_{request.node.name[:40].lower()}")


@pytest.fixture
async def nodes(url: str) -> AsyncIterator[tuple[Store, Store]]:
    a, b = await Store.open_url(url), await Store.open_url(url)
    yield a, b
    await a.close()
    await b.close()


def test_named_parameters_compile_to_positional_ones() -> None:
    sql, names = compile_named("SELECT :a, :b::text, x::int, :a FROM t WHERE y = ':c'")
    assert sql == "SELECT $1, $2::text, x::int, $1 FROM t WHERE y = ':c'"
    assert names == ("a", "b")
    assert rowcount("UPDATE 3") == 3 and rowcount("INSERT 0 1") == 1 and rowcount("") == 0


def test_passwords_never_reach_messages() -> None:
    assert redact("postgresql://relay:s3cret@db.example/relay") == \
        "postgresql://relay:***@db.example/relay"
    assert redact("postgresql://relay@db.example/relay") == "postgresql://relay@db.example/relay"


async def test_two_nodes_never_claim_the_same_work(nodes: tuple[Store, Store]) -> None:
    a, b = nodes
    now = time.time()
    ids = await asyncio.gather(*(a.enqueue(env(f"r{i}@d{i % 7}.example"), now=now)
                                 for i in range(300)))
    claimed: dict[str, list[int]] = {"a": [], "b": []}

    async def worker(name: str, store: Store) -> None:
        while True:
            jobs = await store.claim(now=now, owner=name, lease_seconds=60, limit=7)
            if not jobs:
                return
            claimed[name] += [r[0] for j in jobs for r in j.recipients]

    await asyncio.gather(worker("a", a), worker("b", b), worker("a", a), worker("b", b))
    every = claimed["a"] + claimed["b"]
    assert len(every) == len(set(every)) == 300  # each recipient exactly once
    assert claimed["a"] and claimed["b"]  # both nodes got work
    assert len(set(ids)) == 300


async def test_leases_follow_the_database_clock(nodes: tuple[Store, Store]) -> None:
    a, b = nodes
    now = time.time()
    await a.enqueue(env("x@example.net"), now=now)
    (job,) = await a.claim(now=now, owner="a", lease_seconds=1.0, limit=1)
    # a node whose clock runs an hour fast still cannot take work whose lease runs
    assert await b.claim(now=now + 3600, owner="b", lease_seconds=60, limit=1) == []
    info = await a.get_message(job.message_id)
    assert abs(info.recipients[0].leased_until - (time.time() + 1.0)) < 1.0
    await asyncio.sleep(1.1)
    (again,) = await b.claim(now=now, owner="b", lease_seconds=60, limit=1)
    assert again.recipients == job.recipients


async def test_a_node_that_lost_its_lease_records_nothing(nodes: tuple[Store, Store]) -> None:
    a, b = nodes
    now = time.time()
    qid = await a.enqueue(env("x@example.net"), now=now)
    (job,) = await a.claim(now=now, owner="a", lease_seconds=0.5, limit=1)
    rid = job.recipients[0][0]
    await asyncio.sleep(0.6)
    (taken,) = await b.claim(now=now, owner="b", lease_seconds=60, limit=1)
    assert taken.recipients[0][0] == rid
    # a wakes up and writes its (stale) outcome: fenced out, trace included
    await a.record([JobResult(qid, (RecipientUpdate(rid, S.BOUNCED, "5.1.1", "late"),),
                              (AttemptTrace(rid, now, code="5.1.1"),))], now=now, owner="a")
    assert a is not b and await a.renew_lease("a", [rid], now=now, lease=60) == 0
    info = await b.get_message(qid)
    r = info.recipients[0]
    assert (r.status, r.lease_owner, r.history) == (S.QUEUED, "b", ())
    await b.record([JobResult(qid, (RecipientUpdate(rid, S.DELIVERED, "2.0.0"),),
                              (AttemptTrace(rid, now, code="2.0.0"),))], now=now, owner="b")
    r = (await b.get_message(qid)).recipients[0]
    assert r.status is S.DELIVERED and [h.code for h in r.history] == ["2.0.0"]


async def test_singletons_move_when_their_holder_stops_renewing(
        nodes: tuple[Store, Store]) -> None:
    a, b = nodes
    now = time.time()
    assert await a.singleton("tlsrpt", "a", now=now, ttl=1.0)
    assert await a.singleton("tlsrpt", "a", now=now, ttl=1.0)  # renewed
    assert not await b.singleton("tlsrpt", "b", now=now + 3600, ttl=1.0)
    assert await b.singleton("purge", "b", now=now, ttl=1.0)  # another name is free
    await asyncio.sleep(1.1)
    assert await b.singleton("tlsrpt", "b", now=now, ttl=10)
    assert not await a.singleton("tlsrpt", "a", now=now, ttl=10)
    await b.release_singleton("tlsrpt", "b")
    assert await a.singleton("tlsrpt", "a", now=now, ttl=10)
    assert {n for n, _, _ in await b.singletons()} == {"tlsrpt", "purge"}


async def test_tlsrpt_counts_of_two_nodes_add_up_in_one_period(
        nodes: tuple[Store, Store]) -> None:
    from relay.model import SessionResult

    a, b = nodes
    now = time.time()
    r = SessionResult("mx.example.net", "tlsa", ("3 1 1 00",), "mx.example.net")
    await asyncio.gather(*(s.tlsrpt_add([r], now=now, interval=86400)
                           for s in (a, b) for _ in range(25)))
    (period,) = await a.tlsrpt_open()
    assert sum(x.count for x in period.results) == 50
    assert await raw(a, "SELECT count(*) FROM tlsrpt_periods") == [(1,)]


async def test_server_restart_fails_writes_then_recovers(
        pg_server: PgServer, url: str) -> None:
    store = await Store.open_url(url)
    try:
        first = await store.enqueue(env("x@example.net"), now=time.time())
        pg_server.stop("immediate")  # like a crash of the database server
        try:
            with pytest.raises(StorageUnavailable):
                await store.enqueue(env("y@example.net"), now=time.time())
            with pytest.raises(StorageUnavailable):
                await store.get_message(first)
        finally:
            pg_server.start()
        # the writer reconnects by itself; nothing acknowledged is lost
        deadline = time.monotonic() + 30
        while True:
            try:
                second = await store.enqueue(env("z@example.net"), now=time.time())
                break
            except StorageUnavailable:
                assert time.monotonic() < deadline, "the store never reconnected"
                await asyncio.sleep(0.2)
        ids = {m.id for m in await store.list_messages()}
        assert ids == {first, second}
    finally:
        await store.close()


async def test_nodes_starting_together_migrate_once(url: str) -> None:
    stores = await asyncio.gather(*(Store.open_url(url) for _ in range(4)))
    try:
        assert await raw(stores[0], "SELECT count(*) FROM relay_schema") == [(1,)]
    finally:
        for s in stores:
            await s.close()


async def test_unreachable_server_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StorageUnavailable) as err:
        await Store.open_url("postgresql://relay:pw@127.0.0.1:9/relay")
    assert "127.0.0.1:9" in str(err.value) and "pw" not in str(err.value)


async def test_a_body_changed_in_the_database_is_refused(url: str) -> None:
    import asyncpg

    from relay.errors import CorruptMessage

    store = await Store.open_url(url)
    try:
        qid = await store.enqueue(env("x@example.net"), now=time.time())
        assert await store.load_body(qid) == BODY
        raw_conn = await asyncpg.connect(url)
        try:  # what a bad disk, a restore gone wrong or a stray UPDATE could do
            await raw_conn.execute("UPDATE bodies SET body = $1 WHERE message_id = $2",
                                   BODY.replace(b"hello", b"jello"), qid)
        finally:
            await raw_conn.close()
        with pytest.raises(CorruptMessage) as err:
            await store.load_body(qid)
        assert "digest" in str(err.value)
    finally:
        await store.close()


async def test_health_of_a_shared_queue(pg_server: PgServer, url: str) -> None:
    from relay.config import QueueConfig
    from relay.store import store_health

    await (await Store.open_url(url)).close()  # migrated
    ok, detail = await store_health(QueueConfig(url=url))
    assert ok and "schema version" in detail
    ok, detail = await store_health(QueueConfig(url="postgresql://relay:pw@127.0.0.1:9/x"))
    assert not ok and "127.0.0.1:9" in detail and "pw" not in detail
