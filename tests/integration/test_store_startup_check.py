"""The queue's integrity check as `relay serve` runs it (issue 14, item 1): only after an
unclean stop, in the background (start-up never waits for it), and a file it finds
damaged stops intake at once and is refused until it passes. Real database files, real
kill -9, real page damage; the check is SQLite's own `quick_check`."""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from relay import log
from relay.errors import CorruptDatabase, StorageUnavailable
from relay.model import Envelope
from relay.store import Store
from relay.store.sqlite import backend as sqlite_backend
from relay.store.sqlite import integrity as integrity_module
from relay.store.sqlite.runstate import RunMarker, marker_path

T0 = 1_795_000_000.0
ROOT = Path(__file__).resolve().parents[2]


def env(rcpt: str = "bob@example.net") -> Envelope:
    return Envelope("alice@example.org", (rcpt,), b"Subject: t\r\n\r\n" + b"x" * 3000)


def state(db: Path) -> dict[str, Any]:
    return json.loads(marker_path(db).read_text())


@pytest.fixture
def events() -> Iterator[list[tuple[str, dict[str, Any]]]]:
    seen: list[tuple[str, dict[str, Any]]] = []

    def observe(name: str, fields: dict[str, Any]) -> None:
        if name == "integrity_check":
            seen.append((name, fields))

    log.observers.append(observe)
    try:
        yield seen
    finally:
        log.observers.remove(observe)


async def filled(db: Path, n: int = 50) -> None:
    store = await Store.open(db, check="auto")
    await asyncio.gather(*(store.enqueue(env(f"r{i}@example.net"), now=T0) for i in range(n)))
    await store.close()


def crash_marker(db: Path) -> None:
    """What a relay killed while running leaves (the state it wrote at start)."""
    data = state(db)
    data["state"] = "running"
    marker_path(db).write_text(json.dumps(data))


async def finished(store: Store) -> None:
    integrity = store.backend.integrity  # type: ignore[attr-defined]
    assert integrity._task is not None
    await asyncio.wait_for(asyncio.shield(integrity._task), 30)


def test_run_marker_knows_siblings_and_who_stops_last(tmp_path: Path) -> None:
    db = tmp_path / "relay.db"
    a, b = RunMarker(db), RunMarker(db)
    assert a.acquire().state == "" and a.alone
    a.record(state="running", check="ok")
    a.running()
    assert b.acquire().state == "running" and not b.alone  # a sibling, not a crash
    b.record(state="running")
    b.running()
    a.release(clean=True)  # b still runs: a must not say "stopped"
    assert state(db)["state"] == "running"
    b.release(clean=True)  # the last one out
    assert state(db)["state"] == "stopped" and state(db)["check"] == "ok"
    c = RunMarker(db)
    assert c.acquire().state == "stopped" and c.alone
    c.release(clean=False)


async def test_a_clean_stop_means_no_check_at_the_next_start(
        tmp_path: Path, events: list[Any]) -> None:
    db = tmp_path / "relay.db"
    await filled(db)
    assert state(db)["state"] == "stopped" and state(db)["check"] == "ok"  # new file
    store = await Store.open(db, check="auto")
    try:
        assert store.backend.integrity._task is None  # type: ignore[attr-defined]
        assert state(db)["state"] == "running"
    finally:
        await store.close()
    assert events == []
    assert state(db)["state"] == "stopped"


KILLED = """
import asyncio, sys
from relay.model import Envelope
from relay.store import Store

async def main():
    store = await Store.open(sys.argv[1], check="auto")
    await store.enqueue(Envelope("a@example.org", ("b@example.net",), b"x"), now=1.0)
    print("ready", flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


async def test_after_kill_9_the_check_runs_in_the_background(
        tmp_path: Path, events: list[Any]) -> None:
    db = tmp_path / "relay.db"
    await filled(db)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", KILLED, str(db), cwd=ROOT, stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    assert (await asyncio.wait_for(proc.stdout.readline(), 30)).strip() == b"ready"
    proc.kill()  # SIGKILL: no clean stop
    await asyncio.wait_for(proc.wait(), 10)
    assert state(db)["state"] == "running"
    store = await Store.open(db, check="auto")
    try:
        assert store.backend.integrity.reason == "unclean stop"  # type: ignore[attr-defined]
        await finished(store)
        assert state(db)["check"] == "ok"
        assert [f["result"] for _, f in events] == ["started", "ok"]
        assert events[-1][1]["reason"] == "unclean stop" and events[-1][1]["background"]
        assert len(await store.list_messages()) == 51
    finally:
        await store.close()
    store = await Store.open(db, check="auto")  # that check is done: none now
    await store.close()
    assert [f["result"] for _, f in events] == ["started", "ok"]


async def test_start_up_does_not_wait_for_the_check(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "relay.db"
    await filled(db)
    crash_marker(db)
    release = threading.Event()
    real = integrity_module.quick_check

    def slow(path: Path, **kw: Any) -> str | None:
        assert release.wait(30)  # a check of a million messages, say
        return real(path, **kw)

    monkeypatch.setattr(integrity_module, "quick_check", slow)
    store = await asyncio.wait_for(Store.open(db, check="auto"), 10)
    try:
        # the queue is open and takes mail while the check runs
        qid = await store.enqueue(env(), now=T0 + 1)
        assert (await store.get_message(qid)).id == qid
        assert state(db)["check"] == "pending"
        release.set()
        await finished(store)
        assert state(db)["check"] == "ok"
    finally:
        release.set()
        await store.close()


async def test_stopping_interrupts_the_check_and_the_next_start_owes_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, events: list[Any]) -> None:
    db = tmp_path / "relay.db"
    await filled(db)
    crash_marker(db)
    started = threading.Event()

    def endless(path: Path, *, register: Any = None, **kw: Any) -> str | None:
        # a statement that only an interrupt ends, on a real connection
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        try:
            register(conn)
            started.set()
            conn.execute("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) "
                         "SELECT count(*) FROM c").fetchall()
        except sqlite3.OperationalError as exc:
            assert "interrupted" in str(exc)
            raise InterruptedError from None
        finally:
            conn.close()
        return None

    monkeypatch.setattr(integrity_module, "quick_check", endless)
    store = await Store.open(db, check="auto")
    assert await asyncio.to_thread(started.wait, 10)
    await asyncio.wait_for(store.close(), 10)
    assert state(db)["state"] == "stopped" and state(db)["check"] == "pending"
    monkeypatch.setattr(integrity_module, "quick_check", sqlite_backend_quick_check)
    store = await Store.open(db, check="auto")
    try:
        integrity = store.backend.integrity  # type: ignore[attr-defined]
        assert integrity.reason == "the last check did not finish"
        await finished(store)
        assert state(db)["check"] == "ok"
    finally:
        await store.close()


sqlite_backend_quick_check = integrity_module.quick_check


def damage_recipients(db: Path) -> None:
    """Overwrite the root page of the recipients table (the store is closed: no WAL)."""
    assert not Path(f"{db}-wal").exists()
    conn = sqlite3.connect(db)
    try:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        (root,) = conn.execute(
            "SELECT rootpage FROM sqlite_master WHERE name = 'recipients'").fetchone()
    finally:
        conn.close()
    with db.open("r+b") as f:
        f.seek((root - 1) * page_size)
        f.write(b"\xa5" * page_size)


async def test_damage_found_in_the_background_stops_writes_and_the_file_is_refused(
        tmp_path: Path, events: list[Any]) -> None:
    db = tmp_path / "relay.db"
    await filled(db)
    good = tmp_path / "good.db"
    shutil.copyfile(db, good)
    damage_recipients(db)
    crash_marker(db)  # the damage came with an unclean stop (a power cut, say)
    store = await Store.open(db, check="auto")  # opens: the damage is not on its path
    try:
        detail = await asyncio.wait_for(store.damaged(), 30)
        assert "quick_check" in detail
        with pytest.raises(StorageUnavailable, match="damaged"):
            await store.enqueue(env(), now=T0 + 1)  # nothing more goes into the file
        assert state(db)["check"] == "damaged" and state(db)["detail"] == detail
        (_, last), = [e for e in events if e[1]["result"] == "damaged"]
        assert last["path"] == str(db) and "relay stops" in last["action"]
    finally:
        await store.close()
    with pytest.raises(CorruptDatabase, match="quick_check"):  # refused, at once
        await Store.open(db, check="auto")
    assert state(db)["check"] == "damaged"
    ok, detail = sqlite_backend.health(db)
    assert not ok and "damaged" in detail
    shutil.copyfile(good, db)  # the operator restores a backup
    store = await Store.open(db, check="auto")  # checked before anything else: passes
    try:
        assert state(db)["check"] == "ok"
        assert store.backend.integrity._task is None  # type: ignore[attr-defined]
        assert len(await store.list_messages()) == 50
        await store.enqueue(env(), now=T0 + 2)
    finally:
        await store.close()
    assert events[-1][1]["result"] == "ok" and events[-1][1]["reason"] == "found damaged before"
    assert sqlite_backend.health(db)[0]


async def test_health_reads_the_state_not_the_whole_file(tmp_path: Path) -> None:
    db = tmp_path / "relay.db"
    await filled(db)
    ok, detail = sqlite_backend.health(db)
    assert ok and "integrity ok" in detail and "schema version" in detail
    crash_marker(db)
    data = state(db)
    data["check"] = "pending"
    marker_path(db).write_text(json.dumps(data))
    ok, detail = sqlite_backend.health(db)
    assert ok and "integrity check owed" in detail
