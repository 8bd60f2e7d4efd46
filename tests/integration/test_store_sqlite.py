"""The SQLite backend of the store against real database files (no mocks): files,
pragmas, migrations, corruption, full disks, locks, backups, other processes, kill -9.
What every backend promises is in test_store_contract.py."""

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
from relay.store import Store
from relay.store.ids import ID_LENGTH, IdGenerator, id_time, looks_like_id, recipient_domain
from relay.store.sqlfiles import Migration, migrations, parse_queries
from relay.store.sqlite import schema
from tests.support.envelopes import BODY, T0, env


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


# --- claim, lease, record -----------------------------------------------------------------


# --- operator API ----------------------------------------------------------------------------


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


def test_query_plans_use_the_right_indexes(tmp_path: Path) -> None:
    """Claims and wake-up times must not scan every due row (a big backlog stays cheap)."""
    from relay.store.sqlfiles import statements
    from relay.store.sqlite.backend import Q

    conn = sqlite3.connect(tmp_path / "plan.db")
    for mig in migrations():
        for stmt in statements(mig.sql):
            conn.execute(stmt)

    def plan(sql: str, params: dict[str, object]) -> list[str]:
        return [r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + sql, params)]

    claim = plan(Q.claim, {"now": 1, "owner": "w", "until": 2, "limit": 5, "scan": 20,
                           "retry_limit": 5, "caps": '{"a.example": 0, "b.example": -1}',
                           "initial": 5, "dead_limit": 10, "dead_scan": 40, "window": 4096})
    # the due rows of each kind in order, skipping domains at their limit on the index
    # alone; a dead domain's work through its own rows
    assert claim.count("SEARCH recipients USING COVERING INDEX recipients_due "
                       "(status=? AND next_attempt_at<?)") == 2
    assert claim.count("CO-ROUTINE w") == 2 and "MATERIALIZE w" not in claim
    assert "SEARCH r USING INDEX recipients_domain (domain=? AND status=? AND " \
           "next_attempt_at<?)" in claim
    assert claim[-1] == "SEARCH r USING INDEX recipients_message (message_id=?)"
    assert "SCAN recipients" not in claim and "SCAN r" not in claim[-3:]
    assert "SEARCH r USING INDEX recipients_lease (leased_until>?)" in plan(Q.next_due_leased,
                                                                          {})
    assert any("recipients_due (status=?)" in s for s in plan(Q.next_due_unleased, {}))
    conn.close()


def test_operator_views_read_pages_and_counts_not_the_queue(tmp_path: Path) -> None:
    """`queue list` walks an index in queue id order and stops after a page (no sort, no
    temporary b-tree: the first page costs the same at any depth); `queue stats` reads
    the kept counts; the delay-warning sweep reads only recipients owed a warning."""
    from relay.store.sqlfiles import statements
    from relay.store.sqlite.backend import Q

    conn = sqlite3.connect(tmp_path / "plan.db")
    for mig in migrations():
        for stmt in statements(mig.sql):
            conn.execute(stmt)
    page = {"after": "", "limit": 100, "include_final": 0, "status": None, "domain": "x",
            "code": None, "sender": "a@b", "recipient": None}

    def plan(sql: str, params: dict[str, object]) -> str:
        return " | ".join(r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + sql, params))

    for sql, index in ((Q.list_page_open, "USING INDEX recipients_open (message_id>?)"),
                       (Q.list_page_all, "USING INDEX sqlite_autoindex_messages_1 (id>?)"),
                       (Q.list_page_match,
                        "USING COVERING INDEX recipients_list (message_id>?)")):
        p = plan(sql, page)
        assert index in p, p
        assert "TEMP B-TREE" not in p and "SCAN" not in p, p
    for name in ("stats_by_status", "stats_by_code", "stats_finished", "stats_top_deferred"):
        p = plan(getattr(Q, name), {"limit": 10})
        assert "queue_counts USING PRIMARY KEY" in p and "recipients" not in p, p
    p = plan(Q.stats_messages, {})  # the oldest: the first entry of recipients_open
    assert "recipients USING INDEX recipients_open" in p and "TEMP B-TREE" not in p, p
    p = plan(Q.pending_delay_warnings, {"before": 1.0, "before_id": "1", "limit": 5})
    assert "USING INDEX recipients_unwarned (message_id<?)" in p, p
    p = plan(Q.retry_batch_end, {"after": 0, "limit": 5})
    assert "INTEGER PRIMARY KEY (rowid>?)" in p, p
    p = plan(Q.retry_batch, {"after": 0, "upto": 5, "now": 1.0})
    assert p == "SEARCH recipients USING INTEGER PRIMARY KEY (rowid>? AND rowid<?)", p
    for name in ("renew_lease", "renew_leases", "mark_warned"):  # by id, never by status
        p = plan(getattr(Q, name), {"owner": "w", "ids": "[1, 2]", "until": 2.0, "now": 1.0})
        assert p.startswith("SEARCH recipients USING INTEGER PRIMARY KEY (rowid=?)"), (name, p)
    p = plan(Q.unlease, {"owner": "w", "ids": None})  # the leased rows only
    assert p.startswith("SEARCH recipients USING INDEX recipients_lease"), p
    p = plan(Q.purge, {"cutoff": 1.0, "limit": 5})
    assert "SCAN" not in p, p
    conn.close()


async def test_the_counts_of_an_upgraded_queue_start_right(tmp_path: Path) -> None:
    """Migration 6 counts a queue written by the previous version; the triggers then keep
    the counts (compared with a full count)."""
    path = tmp_path / "relay.db"
    conn = await schema.connect(path, busy_timeout=1.0)
    try:
        assert await schema.migrate(conn, path, migrations()[:5]) == [1, 2, 3, 4, 5]
        for i, (status, code, held, finished) in enumerate([
                ("queued", "", 0, None), ("deferred", "4.4.1", 0, None),
                ("deferred", "4.7.323", 1, None), ("delivered", "2.0.0", 0, T0),
                ("bounced", "5.1.1", 0, T0)]):
            mid = f"1K0MESSAGE{i:06d}"
            await conn.execute(
                "INSERT INTO messages (id, sender, received_at, size, body, headers, held, "
                "finished_at) VALUES (?, 'a@example.org', ?, ?, x'00', x'', ?, ?)",
                (mid, T0 + i, 100 * (i + 1), held, finished))
            await conn.execute(
                "INSERT INTO recipients (message_id, address, domain, status, code, "
                "next_attempt_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (mid, f"r{i}@d{i % 2}.example", f"d{i % 2}.example", status, code, T0, T0))
    finally:
        await conn.close()
    store = await Store.open(path)
    try:
        st = await store.stats(now=T0 + 100)
        assert st.by_status == {"queued": 1, "deferred": 2, "delivered": 1, "bounced": 1}
        assert (st.messages, st.held, st.bytes, st.finished) == (3, 1, 100 + 200 + 300, 2)
        assert sorted(st.by_code) == [("2.0.0", "delivered", 1), ("4.4.1", "deferred", 1),
                                      ("4.7.323", "deferred", 1), ("5.1.1", "bounced", 1)]
        assert st.top_deferred_domains == (("d0.example", 1), ("d1.example", 1))
        assert st.oldest_received_at == T0
        await store.enqueue(env("new@d1.example"), now=T0 + 50)
        assert await store.delete("1K0MESSAGE000002")
        st = await store.stats(now=T0 + 100)
        assert st.by_status == {"queued": 2, "deferred": 1, "delivered": 1, "bounced": 1}
        assert (st.messages, st.held, st.finished) == (3, 0, 2)
        assert st.top_deferred_domains == (("d1.example", 1),)
    finally:
        await store.close()


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
