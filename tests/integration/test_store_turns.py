"""Write turns (relay.store.sqlite.backend.WriteTurns): several writers of one SQLite
queue (the intake workers of one relay) take turns through a `flock` on `<db>-wlock`
instead of polling SQLite's lock; work that piles up while another writes goes into
one transaction. Real files, real locks (two stores in one process hold two open file
descriptions, which `flock` keeps apart as it does two processes)."""

from __future__ import annotations

import asyncio
import fcntl
import os
from pathlib import Path

from relay.model import Envelope
from relay.store import Store


def envelope(n: int) -> Envelope:
    return Envelope(sender="a@example.org", recipients=(f"r{n}@example.com",),
                    body=f"Subject: {n}\r\n\r\nbody {n}\r\n".encode() * 20,
                    client_ip="192.0.2.7", client_helo="client.test")


async def test_two_writers_take_turns_and_batch_what_piled_up(tmp_path: Path) -> None:
    db = tmp_path / "relay.db"
    a = await Store.open(db, write_turns=True)
    b = await Store.open(db, write_turns=True)
    b.tag_ids(2)
    try:
        assert (tmp_path / "relay.db-wlock").exists()
        now = 1_700_000_000.0
        ids = await asyncio.gather(*(s.enqueue(envelope(n), now=now)
                                     for n in range(300) for s in (a, b)))
        assert len(set(ids)) == 600
        stats = await a.stats(now=now)
        assert sum(stats.by_status.values()) == 600
        commits = a._writer.commits + b._writer.commits
        assert commits < 100, f"{commits} transactions for 600 messages: no batching"
    finally:
        await a.close()
        await b.close()


async def test_a_writer_waits_for_the_turn_another_holds(tmp_path: Path) -> None:
    db = tmp_path / "relay.db"
    store = await Store.open(db, write_turns=True)
    fd = os.open(tmp_path / "relay.db-wlock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another process is writing
        pending = [asyncio.ensure_future(store.enqueue(envelope(n), now=1.7e9))
                   for n in range(20)]
        done, _ = await asyncio.wait(pending, timeout=0.5)
        assert not done, "committed while another writer had the turn"
        fcntl.flock(fd, fcntl.LOCK_UN)
        assert len(set(await asyncio.wait_for(asyncio.gather(*pending), 10))) == 20
        assert store._writer.commits == 1, "what piled up went into one transaction"
    finally:
        os.close(fd)
        await store.close()
