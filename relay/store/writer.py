"""The one writer task of a store: every write of this process goes through it.

Group commit: callers put work on a queue and await a future; the writer takes
everything pending (up to `batch_max` items), runs it in ONE transaction, COMMITs, and
only then resolves the futures. While one COMMIT (an fsync) is in flight, new work
piles up and goes into the next transaction, so many concurrent callers share fsyncs.

Two kinds of work:
- inserts (enqueue): consecutive ones are written with `executemany`;
- operations (`async fn(conn) -> value`): each runs inside a SAVEPOINT, so a logical
  error in one (an IntegrityError, a RelayError) is rolled back alone.
A storage failure (disk full, I/O error, lock timeout) fails the whole batch: every
caller of it gets the StoreError and nothing of the batch is committed. The writer
itself survives, and the next batch tries again (reopening the connection after I/O
or read-only errors), so intake resumes by itself when the problem goes away.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite

from relay import log
from relay.errors import RelayError, StorageUnavailable
from relay.store import errors as errs
from relay.store.sqlfiles import Q

Operation = Callable[[aiosqlite.Connection], Awaitable[Any]]


@dataclass
class _Insert:
    message: tuple[Any, ...]
    recipients: list[tuple[Any, ...]]
    result: str
    future: asyncio.Future[Any]


@dataclass
class _Op:
    fn: Operation
    future: asyncio.Future[Any]


_STOP = object()


class Writer:
    def __init__(
        self,
        path: Path,
        connect: Callable[[], Awaitable[aiosqlite.Connection]],
        conn: aiosqlite.Connection,
        *,
        batch_max: int,
        on_commit: Callable[[bool], None] | None = None,
    ) -> None:
        self._path = path
        self._connect = connect
        self._conn: aiosqlite.Connection | None = conn
        self._batch_max = max(1, batch_max)
        self._on_commit = on_commit
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._failing: str | None = None  # "full" | "unavailable" while writes fail
        self.commits = 0  # transactions committed (for tests and metrics)
        self.items = 0  # items committed

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="store-writer")

    def insert(self, message: tuple[Any, ...], recipients: list[tuple[Any, ...]],
               result: str) -> asyncio.Future[Any]:
        self._check_open()
        fut = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Insert(message, recipients, result, fut))
        return fut

    async def run(self, fn: Operation) -> Any:
        """Run `fn(conn)` inside the writer's next transaction; its value after COMMIT."""
        return await self.submit(fn)

    def submit(self, fn: Operation) -> asyncio.Future[Any]:
        """Queue `fn(conn)` at once (not awaiting it): it shares the next group commit with
        whatever is submitted right after it; the future resolves after that COMMIT."""
        self._check_open()
        fut = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Op(fn, fut))
        return fut

    def _check_open(self) -> None:
        if self._closing:
            raise StorageUnavailable(f"queue database {self._path} is closing")

    async def close(self) -> None:
        """Finish everything already submitted, then close the connection."""
        if self._closing:
            return
        self._closing = True
        self._queue.put_nowait(_STOP)
        if self._task is not None:
            await self._task
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    async def _loop(self) -> None:
        stop = False
        while not stop:
            item = await self._queue.get()
            if item is _STOP:
                break
            batch = [item]
            while len(batch) < self._batch_max and not self._queue.empty():
                nxt = self._queue.get_nowait()
                if nxt is _STOP:
                    stop = True
                    break
                batch.append(nxt)
            try:
                await self._run_batch(batch)
            except BaseException as exc:  # never let the writer die with futures pending
                for it in batch:
                    if not it.future.done():
                        it.future.set_exception(errs.storage_error(exc, self._path))
                if isinstance(exc, asyncio.CancelledError):
                    raise

    async def _run_batch(self, batch: Sequence[_Insert | _Op]) -> None:
        live = [it for it in batch if not it.future.cancelled()]
        if not live:
            return
        results: list[tuple[bool, Any]] = []
        conn = None
        try:
            if self._conn is None:
                self._conn = await self._connect()
            conn = self._conn
            await conn.execute("BEGIN IMMEDIATE")
            i = 0
            while i < len(live):
                it = live[i]
                if isinstance(it, _Insert):
                    j = i
                    while j < len(live) and isinstance(live[j], _Insert):
                        j += 1
                    inserts: list[_Insert] = live[i:j]  # type: ignore[assignment]
                    await conn.executemany(Q.insert_message, [x.message for x in inserts])
                    await conn.executemany(
                        Q.insert_recipient, [r for x in inserts for r in x.recipients]
                    )
                    results.extend((True, x.result) for x in inserts)
                    i = j
                    continue
                results.append(await self._run_op(conn, it))
                i += 1
            await conn.execute("COMMIT")
        except Exception as exc:
            await self._failed(conn, exc, live)
            return
        self.commits += 1
        self.items += len(live)
        if self._failing:
            self._failing = None
            log.event("storage_recovered", path=str(self._path))
        for it, (ok, value) in zip(live, results, strict=True):
            if it.future.done():
                continue
            if ok:
                it.future.set_result(value)
            else:
                it.future.set_exception(value)
        if self._on_commit is not None:
            self._on_commit(any(isinstance(it, _Insert) for it in live))

    async def _run_op(self, conn: aiosqlite.Connection, it: _Op) -> tuple[bool, Any]:
        await conn.execute("SAVEPOINT op")
        try:
            value = await it.fn(conn)
        except (sqlite3.IntegrityError, sqlite3.ProgrammingError, RelayError) as exc:
            await conn.execute("ROLLBACK TO op")
            await conn.execute("RELEASE op")
            if isinstance(exc, sqlite3.Error):
                return False, errs.storage_error(exc, self._path)
            return False, exc
        await conn.execute("RELEASE op")
        return True, value

    async def _failed(
        self, conn: aiosqlite.Connection | None, exc: BaseException, live: Sequence[Any]
    ) -> None:
        err = errs.storage_error(exc, self._path)
        kind = "full" if errs.is_full(exc) else "unavailable"
        if self._failing != kind:  # log the change, not every failed batch
            log.event("storage_error", level="error", path=str(self._path), kind=kind,
                      detail=str(exc))
        self._failing = kind
        if conn is not None:
            reopen = errs.needs_reopen(exc)
            try:
                if conn.in_transaction:
                    await conn.execute("ROLLBACK")
            except Exception:
                reopen = True
            if reopen:
                self._conn = None
                try:
                    await conn.close()
                except Exception:
                    pass
        for it in live:
            if not it.future.done():
                it.future.set_exception(err)
