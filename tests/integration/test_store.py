"""The SQLite queue store against real database files (no mocks)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from relay.errors import CorruptDatabase, NotFound, StorageFull, StorageUnavailable, StoreError
from relay.model import Envelope
from relay.model import RecipientStatus as S
from relay.store import AttemptTrace, JobResult, RecipientUpdate, Store, schema
from relay.store.ids import ID_LENGTH, IdGenerator, id_time, looks_like_id, recipient_domain
from relay.store.sqlfiles import Migration, migrations, parse_queries

T0 = 1_795_000_000.0  # a fixed "now" (2026-11-18); the store never reads the clock
BODY = b"From: a@example.org\r\nSubject: test\r\n\r\n" + b"x" * 5000 + b"\r\n"
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


def env(*rcpts: str, sender: str = "alice@example.org", body: bytes = BODY) -> Envelope:
    return Envelope(sender=sender, recipients=rcpts, body=body, client_ip="192.0.2.7",
                    client_helo="mail.example.org")


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = await Store.open(tmp_path / "relay.db")
    yield s
    await s.close()


def rows(path: Path, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    """Read with a plain, separate sqlite3 connection (what another process would see)."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


# --- ids and domains (pure) -------------------------------------------------------------


def test_ids_are_fixed_width_unique_and_sort_by_arrival() -> None:
    gen = IdGenerator()
    ids = [gen.next(T0) for _ in range(3000)]  # many in the same microsecond
    ids += [gen.next(T0 - 5)]  # the clock going backwards never breaks the order
    ids += [gen.next(T0 + 1)]
    assert all(len(i) == ID_LENGTH and looks_like_id(i) for i in ids)
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert abs(id_time(ids[0]) - T0) < 1e-5
    assert abs(id_time(ids[-1]) - (T0 + 1)) < 1e-5
    # another process (another generator) at a later time sorts after
    assert IdGenerator().next(T0 + 2) > ids[-1]


def test_recipient_domain_is_lower_case_idna() -> None:
    assert recipient_domain("User@Example.COM") == "example.com"
    assert recipient_domain("u@Bücher.Example") == "xn--bcher-kva.example"
    assert recipient_domain("u@xn--bcher-kva.example") == "xn--bcher-kva.example"
    assert recipient_domain("u@[192.0.2.1]") == "[192.0.2.1]"
    assert recipient_domain("u@example.com.") == "example.com"


def test_named_queries_parse() -> None:
    q = parse_queries("-- name: a\nSELECT 1;\n-- comment\n-- name: b\nSELECT\n 2;\n")
    assert q == {"a": "SELECT 1", "b": "SELECT\n 2"}
    with pytest.raises(RuntimeError):
        parse_queries("-- name: a\nSELECT 1;\n-- name: a\nSELECT 2;")


# --- opening, migrations, corruption -----------------------------------------------------


async def test_open_creates_folder_and_sets_pragmas(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "relay.db"
    store = await Store.open(path)
    await store.close()
    assert path.exists()
    assert rows(path, "PRAGMA journal_mode") == [("wal",)]
    assert rows(path, "PRAGMA user_version") == [(migrations()[-1].version,)]
    names = {r[0] for r in rows(path, "SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"messages", "recipients", "attempts"} <= names


async def test_store_connections_use_full_sync_and_foreign_keys(tmp_path: Path) -> None:
    path = tmp_path / "relay.db"
    conn = await schema.connect(path, busy_timeout=1.0)
    try:
        for pragma, want in (("synchronous", 2), ("foreign_keys", 1), ("busy_timeout", 1000)):
            async with conn.execute(f"PRAGMA {pragma}") as cur:
                assert (await cur.fetchone())[0] == want, pragma
    finally:
        await conn.close()


async def test_missing_database_is_an_error_when_create_is_false(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        await Store.open(tmp_path / "nope.db", create=False)
    assert not (tmp_path / "nope.db").exists()


async def test_migrations_apply_once(tmp_path: Path) -> None:
    path = tmp_path / "relay.db"
    store = await Store.open(path)
    qid = await store.enqueue(env("bob@example.net"), now=T0)
    await store.close()
    # a second open does not run 001 again (it would fail: CREATE TABLE without IF NOT
    # EXISTS) and keeps the data
    store = await Store.open(path)
    assert (await store.get_message(qid)).id == qid
    await store.close()
    conn = await schema.connect(path, busy_timeout=1.0)
    try:
        assert await schema.migrate(conn, path) == []
        n = len(migrations()) + 1  # the next version after the shipped ones
        extra = (*migrations(), Migration(n, f"{n:03d}_extra.sql", "CREATE TABLE extra (x);\n"))
        assert await schema.migrate(conn, path, extra) == [n]
        assert await schema.migrate(conn, path, extra) == []
        assert await schema.user_version(conn) == n
        # a failing migration leaves nothing behind: not the table, not the version
        bad = (*extra, Migration(n + 1, f"{n + 1:03d}_bad.sql",
                                 "CREATE TABLE y (x);\nSELECT * FROM nope;"))
        with pytest.raises(sqlite3.OperationalError):
            await schema.migrate(conn, path, bad)
        assert await schema.user_version(conn) == n
    finally:
        await conn.close()
    assert rows(path, "SELECT name FROM sqlite_master WHERE name = 'y'") == []


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "relay.db"
    await (await Store.open(path)).close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(StoreError, match="schema version 99"):
        await Store.open(path)


async def test_garbage_file_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "relay.db"
    store = await Store.open(path)
    await store.enqueue(env("bob@example.net"), now=T0)
    await store.close()
    garbage = os.urandom(64 * 1024)
    path.write_bytes(garbage)
    with pytest.raises(CorruptDatabase) as info:
        await Store.open(path)
    assert str(path) in str(info.value)
    assert "corrupt" in str(info.value)
    assert path.read_bytes() == garbage  # never silently re-created


async def test_damaged_page_is_found_by_quick_check(tmp_path: Path) -> None:
    path = tmp_path / "relay.db"
    store = await Store.open(path)
    await asyncio.gather(*(store.enqueue(env(f"r{i}@example.net"), now=T0) for i in range(50)))
    await store.close()
    page_size = rows(path, "PRAGMA page_size")[0][0]
    (root,) = rows(path, "SELECT rootpage FROM sqlite_master WHERE name = 'recipients'")[0]
    with path.open("r+b") as f:  # overwrite the recipients table's root page
        f.seek((root - 1) * page_size)
        f.write(b"\xa5" * page_size)
    with pytest.raises(CorruptDatabase, match=re.escape(str(path))):
        await Store.open(path)


# --- intake: durability, group commit, failures ------------------------------------------


async def test_enqueue_is_durable_when_it_returns(store: Store) -> None:
    qid = await store.enqueue(env("Bob@Example.NET", "carol@bücher.example"), now=T0)
    # a second, independent connection sees the committed row at once
    got = rows(store.path, "SELECT id, sender, received_at, size, body FROM messages")
    assert got == [(qid, "alice@example.org", T0, len(BODY), BODY)]
    rcpts = rows(store.path, "SELECT address, domain, status, attempts, next_attempt_at "
                             "FROM recipients ORDER BY id")
    assert rcpts == [("Bob@Example.NET", "example.net", "queued", 0, T0),
                     ("carol@bücher.example", "xn--bcher-kva.example", "queued", 0, T0)]
    assert await store.load_body(qid) == BODY
    assert await store.load_headers(qid) == b"From: a@example.org\r\nSubject: test\r\n"


async def test_enqueue_waits_for_the_commit(store: Store) -> None:
    other = sqlite3.connect(store.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    try:
        task = asyncio.ensure_future(store.enqueue(env("bob@example.net"), now=T0))
        await asyncio.sleep(0.3)
        assert not task.done()  # no id before the COMMIT
    finally:
        other.execute("COMMIT")
        other.close()
    qid = await asyncio.wait_for(task, 10)
    assert rows(store.path, "SELECT id FROM messages") == [(qid,)]


async def test_enqueue_returns_only_after_commit_finished(store: Store) -> None:
    """Slow the writer's COMMIT down: a caller told too early would find no row."""
    conn = store._writer._conn
    assert conn is not None
    state = {"commit": False}

    def trace(sql: str) -> None:  # runs in the connection's thread, before each statement
        state["commit"] = sql.strip().upper() == "COMMIT"

    def progress() -> int:
        if state["commit"]:
            time.sleep(0.05)  # every few VM steps of COMMIT
        return 0

    await conn.set_trace_callback(trace)
    await conn.set_progress_handler(progress, 1)
    ids = await asyncio.gather(*(store.enqueue(env(f"r{i}@a.example"), now=T0)
                                 for i in range(3)))
    # no await since enqueue returned: what another connection sees now is committed
    assert {r[0] for r in rows(store.path, "SELECT id FROM messages")} == set(ids)
    await conn.set_progress_handler(None, 1)
    await conn.set_trace_callback(None)


async def test_group_commit_groups_concurrent_enqueues(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "relay.db", commit_batch=512)
    try:
        before = store.commits
        ids = await asyncio.gather(
            *(store.enqueue(env(f"r{i}@example.net"), now=T0) for i in range(300)))
        commits = store.commits - before
        assert len(set(ids)) == 300
        assert 1 <= commits <= 10, commits  # 300 messages, a handful of fsyncs
        assert rows(store.path, "SELECT count(*) FROM messages") == [(300,)]
    finally:
        await store.close()


async def test_commit_batch_caps_a_transaction(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "relay.db", commit_batch=10)
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


async def test_page_limit_full_then_recovers_without_reopen(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "relay.db", max_page_count=80)
    try:
        accepted: list[str] = []
        refused = 0
        for i in range(120):
            try:
                accepted.append(await store.enqueue(env(f"r{i}@example.net"), now=T0))
            except StorageFull:
                refused += 1
        assert accepted and refused
        # nothing half-written: every refused message left no row
        assert rows(store.path, "SELECT count(*) FROM messages") == [(len(accepted),)]
        with pytest.raises(StorageFull):
            await store.enqueue(env("late@example.net"), now=T0)
        # the operator frees space; the same store (no reopen) accepts mail again
        for qid in accepted[:5]:
            assert await store.delete(qid)
        qid = await store.enqueue(env("after@example.net"), now=T0)
        assert rows(store.path, "SELECT id FROM messages WHERE id = ?", (qid,)) == [(qid,)]
        # and a higher limit also helps at once
        await store.set_max_page_count(100_000)
        await asyncio.gather(*(store.enqueue(env("more@example.net"), now=T0)
                               for _ in range(50)))
    finally:
        await store.close()


async def test_concurrent_batch_fails_together_on_full(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "relay.db", max_page_count=40)
    try:
        results = await asyncio.gather(
            *(store.enqueue(env(f"r{i}@example.net"), now=T0) for i in range(100)),
            return_exceptions=True)
        ok = [r for r in results if isinstance(r, str)]
        full = [r for r in results if isinstance(r, StorageFull)]
        assert len(ok) + len(full) == 100 and full
        stored = {r[0] for r in rows(store.path, "SELECT id FROM messages")}
        assert stored == set(ok)
    finally:
        await store.close()


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


async def test_real_disk_full_then_recovers(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "small", "2m") as mnt:
        store = await Store.open(mnt / "relay.db")
        try:
            filler = mnt / "filler"
            with filler.open("wb") as f:  # leave well under a megabyte free
                with contextlib.suppress(OSError):
                    f.write(b"\0" * (2 * 1024 * 1024))
            accepted, refused = 0, 0
            for i in range(400):
                try:
                    await store.enqueue(env(f"r{i}@example.net"), now=T0)
                    accepted += 1
                except StorageFull:
                    refused += 1
                    if refused >= 3:
                        break
            assert refused >= 3, (accepted, refused)
            filler.unlink()  # the problem goes away
            qid = await store.enqueue(env("after@example.net"), now=T0)
            assert (await store.get_message(qid)).id == qid
        finally:
            await store.close()


async def test_lock_timeout_is_unavailable_then_recovers(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "relay.db", busy_timeout=0.2)
    try:
        other = sqlite3.connect(store.path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(StorageUnavailable, match="locked"):
                await store.enqueue(env("bob@example.net"), now=T0)
        finally:
            other.execute("ROLLBACK")
            other.close()
        qid = await store.enqueue(env("bob@example.net"), now=T0)
        assert rows(store.path, "SELECT id FROM messages") == [(qid,)]
    finally:
        await store.close()


async def test_broken_write_connection_is_reopened(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "relay.db")
    try:
        await store.enqueue(env("bob@example.net"), now=T0)
        # the write connection breaks under the writer (as after an I/O error)
        await store._writer._conn.close()  # type: ignore[union-attr]
        with pytest.raises(StorageUnavailable):
            await store.enqueue(env("bob@example.net"), now=T0)
        qid = await store.enqueue(env("bob@example.net"), now=T0)  # reopened by itself
        assert (await store.get_message(qid)).id == qid
    finally:
        await store.close()


async def test_close_finishes_pending_enqueues(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "relay.db")
    tasks = [asyncio.ensure_future(store.enqueue(env("b@example.net"), now=T0))
             for _ in range(20)]
    await asyncio.sleep(0)
    await store.close()
    ids = await asyncio.gather(*tasks)
    assert len(rows(tmp_path / "relay.db", "SELECT id FROM messages")) == len(set(ids)) == 20
    with pytest.raises(StorageUnavailable):
        await store.enqueue(env("b@example.net"), now=T0)


# --- claim, lease, record -----------------------------------------------------------------


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


async def test_expired_lease_returns_to_the_queue(store: Store) -> None:
    qid = await store.enqueue(env("bob@example.net"), now=T0)
    (job,) = await store.claim(now=T0, owner="crashed", lease_seconds=30, limit=5)
    assert await store.next_due(T0) == T0 + 30  # the lease's end
    assert await store.claim(now=T0 + 29, owner="w2", lease_seconds=30, limit=5) == []
    (again,) = await store.claim(now=T0 + 30, owner="w2", lease_seconds=30, limit=5)
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
    assert rows(store.path, "SELECT count(*) FROM attempts") == [(0,)]
    assert not await store.delete(qid)


# --- operator API ----------------------------------------------------------------------------


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
        assert rows(store.path, f"SELECT count(*) FROM {table}") == [(0,)]
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


async def test_backup_while_writing(store: Store, tmp_path: Path) -> None:
    first = await asyncio.gather(*(store.enqueue(env(f"r{i}@a.example"), now=T0)
                                   for i in range(200)))
    writing = asyncio.ensure_future(asyncio.gather(
        *(store.enqueue(env(f"s{i}@a.example"), now=T0) for i in range(300))))
    dest = tmp_path / "backups" / "copy.db"
    assert await store.backup(dest) == dest
    await writing
    assert rows(dest, "PRAGMA quick_check") == [("ok",)]
    copied = {r[0] for r in rows(dest, "SELECT id FROM messages")}
    assert set(first) <= copied
    assert not list(dest.parent.glob(".*tmp*"))
    # the copy is a working queue
    restored = await Store.open(dest)
    try:
        assert await restored.load_body(first[0]) == BODY
    finally:
        await restored.close()
    with pytest.raises(StoreError):
        await store.backup(store.path)


async def test_another_process_writes_while_the_store_is_open(store: Store) -> None:
    ids = [await store.enqueue(env(f"r{i}@a.example"), now=T0) for i in range(3)]
    code = (
        "import asyncio, sys\n"
        "from relay.store import Store\n"
        "async def main():\n"
        "    s = await Store.open(sys.argv[1], check=False, create=False)\n"
        "    print(await s.hold(sys.argv[2]), await s.delete(sys.argv[3]))\n"
        "    await s.close()\n"
        "asyncio.run(main())\n"
    )
    writing = asyncio.ensure_future(asyncio.gather(
        *(store.enqueue(env(f"s{i}@a.example"), now=T0) for i in range(200))))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, str(store.path), ids[0], ids[1],
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    assert out.splitlines()[-1].split() == [b"True", b"True"]
    await writing
    assert (await store.get_message(ids[0])).held
    with pytest.raises(NotFound):
        await store.get_message(ids[1])
    assert len(await store.list_messages()) == 2 + 200


async def test_bodies_survive_reopen_byte_for_byte(tmp_path: Path) -> None:
    path = tmp_path / "relay.db"
    store = await Store.open(path)
    bodies = {}
    for i in range(20):
        body = b"Subject: %d\r\n\r\n" % i + os.urandom(3000)
        bodies[await store.enqueue(env("b@a.example", body=body), now=T0)] = body
    await store.close()
    store = await Store.open(path)
    try:
        for qid, body in bodies.items():
            got = await store.load_body(qid)
            assert hashlib.sha256(got).digest() == hashlib.sha256(body).digest()
    finally:
        await store.close()


def test_query_plans_use_the_right_indexes(tmp_path: Path) -> None:
    """Claims and wake-up times must not scan every due row (a big backlog stays cheap)."""
    from relay.store.sqlfiles import Q, statements

    conn = sqlite3.connect(tmp_path / "plan.db")
    for stmt in statements(migrations()[0].sql):
        conn.execute(stmt)

    def plan(sql: str, params: dict[str, object]) -> list[str]:
        return [r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + sql, params)]

    claim = plan(Q.claim, {"now": 1, "owner": "w", "until": 2, "limit": 5, "scan": 20})
    assert claim[-1] == "SEARCH r USING INDEX recipients_message (message_id=?)"
    assert "SCAN recipients" not in claim and "SCAN r" not in claim[-3:]
    assert "SEARCH r USING INDEX recipients_lease (leased_until>?)" in plan(Q.next_due_leased,
                                                                          {})
    assert any("recipients_due (status=?)" in s for s in plan(Q.next_due_unleased, {}))
    conn.close()


CRASHER = """
import asyncio, hashlib, os, sys, time
from relay.model import Envelope
from relay.store import Store

async def main():
    store = await Store.open(sys.argv[1])
    async def session(n):
        while True:
            body = b"Subject: crash\\r\\n\\r\\n" + os.urandom(2000)
            qid = await store.enqueue(Envelope("c@example.org", ("r@example.net",), body),
                                      now=time.time())
            # printed only after enqueue returned: this is the "250 queued as" moment
            sys.stdout.write(f"{qid} {hashlib.sha256(body).hexdigest()}\\n")
            sys.stdout.flush()
    await asyncio.gather(*(session(i) for i in range(20)))

asyncio.run(main())
"""


async def test_kill_9_loses_no_acknowledged_message(tmp_path: Path) -> None:
    path = tmp_path / "relay.db"
    acknowledged: dict[str, str] = {}
    for round_ in range(3):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CRASHER, str(path), stdout=asyncio.subprocess.PIPE)
        assert proc.stdout is not None
        seen = 0
        try:
            while seen < 200 + 150 * round_:  # kill at a different moment each round
                line = await asyncio.wait_for(proc.stdout.readline(), 30)
                assert line, "the writer process died on its own"
                qid, digest = line.decode().split()
                acknowledged[qid] = digest
                seen += 1
        finally:
            proc.kill()  # SIGKILL, mid-batch
            await proc.wait()
        # lines already written before the kill count as acknowledged too
        for line in (await proc.stdout.read()).decode().splitlines():
            if len(line.split()) == 2:
                qid, digest = line.split()
                acknowledged[qid] = digest
        store = await Store.open(path)  # quick_check passes after the crash
        try:
            for qid, digest in acknowledged.items():
                assert hashlib.sha256(await store.load_body(qid)).hexdigest() == digest, qid
        finally:
            await store.close()
    assert len(acknowledged) >= 200 + 350 + 500
