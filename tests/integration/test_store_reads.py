"""Reads of the store under real concurrency, on SQLite and on PostgreSQL: many coroutines
reading at once while the writer commits (issue 10, items 1 and 2). No mocks: a real
database, the real writer task, reads racing on the event loop."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from relay.model import Envelope
from tests.support.stores import BACKENDS, open_backend, pg_server_fixture

T0 = 1_795_000_000.0
pg_server = pg_server_fixture()


def env(rcpt: str, body: bytes = b"Subject: t\r\n\r\nhello\r\n") -> Envelope:
    return Envelope(sender="alice@example.org", recipients=(rcpt,), body=body)


@pytest.mark.parametrize("kind", BACKENDS)
async def test_snapshot_reads_run_side_by_side_without_interleaving(
        kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Hundreds of `get_message` (a multi-statement snapshot) at once: none fails with
    "cannot start a transaction within a transaction", each sees its own message whole."""
    store = await open_backend(kind, tmp_path, request)
    try:
        ids = list(await asyncio.gather(*(
            store.enqueue(env(f"r{i}@d{i % 7}.example"), now=T0) for i in range(300))))
        infos = await asyncio.gather(*(store.get_message(i) for i in ids),
                                     return_exceptions=True)
        errors = [repr(x) for x in infos if isinstance(x, BaseException)]
        assert errors == []
        assert [i.id for i in infos] == ids  # type: ignore[union-attr]
        assert all(len(i.recipients) == 1 for i in infos)  # type: ignore[union-attr]
    finally:
        await store.close()


@pytest.mark.parametrize("kind", BACKENDS)
async def test_a_committed_body_is_always_visible_while_snapshots_are_read(
        kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """New mail committed while other coroutines read snapshots: its body must be read at
    once. A read that landed inside another coroutine's older read transaction (one shared
    connection) saw no row: `load_body` raised NotFound for mail that had been committed."""
    store = await open_backend(kind, tmp_path, request)
    old = list(await asyncio.gather(*(
        store.enqueue(env(f"o{i}@slow.example"), now=T0) for i in range(200))))
    stop = asyncio.Event()
    failures: list[str] = []

    async def snapshots() -> None:  # like NDRs and delay warnings built during a retry wave
        i = 0
        while not stop.is_set():
            await store.get_message(old[i % len(old)])
            i += 1

    async def new_mail(n: int) -> None:
        for k in range(40):
            body = b"Subject: new %d/%d\r\n\r\nbody\r\n" % (n, k)
            qid = await store.enqueue(env(f"n{n}.{k}@fast.example", body), now=T0 + 1)
            try:
                got = await store.load_body(qid)
            except Exception as exc:
                failures.append(f"{qid}: {exc!r}")
                continue
            if got != body:
                failures.append(f"{qid}: wrong body")

    readers = [asyncio.create_task(snapshots()) for _ in range(8)]
    try:
        await asyncio.gather(*(new_mail(n) for n in range(10)))
    finally:
        stop.set()
        results = await asyncio.gather(*readers, return_exceptions=True)
        await store.close()
    assert failures == []
    assert [r for r in results if r is not None] == []
