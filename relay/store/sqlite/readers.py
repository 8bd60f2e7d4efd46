"""SQLite's read connections: a small pool, one caller per connection at a time.

A read (`await readers.read(fn)`) checks a connection out of the pool and runs the async
`fn(conn)` with a relay.store.conn.Conn over it: each statement runs in a worker thread,
the first one opens the read transaction (`BEGIN`), and `COMMIT` runs when `fn` is done,
after which the connection goes back to the pool. All its statements see one snapshot,
and nothing else can run on that connection meanwhile. `run(fn)` runs a synchronous
`fn(conn)` whole in one thread hop (the backup API).

Why a pool and not one shared connection with a lock, or one statement per snapshot:
- one shared connection (before issue 10) let coroutines interleave statements: two
  snapshot reads collided ("cannot start a transaction within a transaction"), and a
  plain read landing inside another coroutine's open read transaction saw that older
  snapshot (a message committed after it was "not found");
- a lock would serialize every read behind the slowest (a backup, a big `queue list`)
  and hold it across event-loop hops;
- one statement per snapshot would bend every multi-part read into one SQL statement,
  and leave the rule to reviewers.
Here each read costs one thread hop (aiosqlite costs one per execute, fetch and close),
reads run side by side (SQLite releases the GIL), and a snapshot cannot leak.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from relay.errors import StorageUnavailable
from relay.store.conn import Params, Row
from relay.store.sqlite import errors as errs

T = TypeVar("T")
ReadFn = Callable[[sqlite3.Connection], T]


@dataclass
class _Slot:
    conn: sqlite3.Connection | None = None


class Readers:
    """`await readers.run(fn)`: `fn(conn)` in one read transaction on a pooled connection.

    `connect()` opens a new read connection (in the worker thread, when a slot first
    needs one, and again after a connection failed in a way that needs a reopen);
    `first`: one already open.
    """

    def __init__(self, connect: Callable[[], sqlite3.Connection], size: int, *,
                 first: sqlite3.Connection | None = None) -> None:
        self._connect = connect
        self._size = max(1, size)
        self._slots: asyncio.Queue[_Slot] = asyncio.Queue()
        for i in range(self._size):
            self._slots.put_nowait(_Slot(first if i == 0 else None))
        self._executor = ThreadPoolExecutor(self._size, thread_name_prefix="store-read")
        self._closed = False
        self.reads = 0  # reads run (for tests and benchmarks)

    async def run(self, fn: ReadFn[T], *, transaction: bool = True) -> T:
        """`fn(conn)` on a connection of its own; `transaction=False` for what manages
        its own (the backup API)."""
        if self._closed:
            raise StorageUnavailable("the queue store is closed")
        slot = await self._slots.get()
        loop = asyncio.get_running_loop()
        try:
            future = self._executor.submit(self._call, slot, fn, transaction)
        except BaseException:
            self._slots.put_nowait(slot)
            raise
        # The slot returns when the thread is done with it, even if our caller is
        # cancelled meanwhile (the thread cannot be interrupted).
        future.add_done_callback(
            lambda _: loop.call_soon_threadsafe(self._slots.put_nowait, slot))
        self.reads += 1
        return await asyncio.wrap_future(future, loop=loop)

    async def read(self, fn: Callable[[_SlotConn], Awaitable[T]]) -> T:
        """The async `fn(conn)` in one read transaction on a connection of its own."""
        if self._closed:
            raise StorageUnavailable("the queue store is closed")
        slot = await self._slots.get()
        loop = asyncio.get_running_loop()
        conn = _SlotConn(self, slot, loop)
        failed: BaseException | None = None
        try:
            value = await fn(conn)
        except BaseException as exc:
            failed = exc
            raise
        finally:
            # COMMIT (or ROLLBACK) in the thread; the slot returns when that is done,
            # without making the caller wait for it
            future = self._executor.submit(self._finish, slot, failed)
            future.add_done_callback(
                lambda _: loop.call_soon_threadsafe(self._slots.put_nowait, slot))
        self.reads += 1
        return value

    def _statement(self, slot: _Slot, first: bool, fn: ReadFn[T]) -> T:
        if slot.conn is None:
            slot.conn = self._connect()
        if first:
            slot.conn.execute("BEGIN")
        return fn(slot.conn)

    def _finish(self, slot: _Slot, failed: BaseException | None) -> None:
        conn = slot.conn
        if conn is None:
            return
        drop = isinstance(failed, sqlite3.Error) and errs.primary_code(failed) in errs.REOPEN
        try:
            if conn.in_transaction:
                conn.execute("ROLLBACK" if failed is not None else "COMMIT")
        except sqlite3.Error:
            drop = True
        if drop or conn.in_transaction:
            slot.conn = None
            _close(conn)

    def _call(self, slot: _Slot, fn: ReadFn[T], transaction: bool) -> T:
        if slot.conn is None:
            slot.conn = self._connect()
        conn = slot.conn
        try:
            if transaction:
                conn.execute("BEGIN")
            value = fn(conn)
            if conn.in_transaction:
                conn.execute("COMMIT")
            return value
        except BaseException as exc:
            drop = isinstance(exc, sqlite3.Error) and errs.primary_code(exc) in errs.REOPEN
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            except sqlite3.Error:
                drop = True
            if drop or conn.in_transaction:
                slot.conn = None
                _close(conn)
            raise

    async def close(self) -> None:
        """Wait for the reads in progress, then close every connection."""
        if self._closed:
            return
        self._closed = True
        for _ in range(self._size):
            slot = await self._slots.get()
            if slot.conn is not None:
                _close(slot.conn)
                slot.conn = None
        self._executor.shutdown(wait=False)


def _close(conn: sqlite3.Connection) -> None:
    try:
        conn.close()
    except sqlite3.Error:
        pass


class _SlotConn:
    """relay.store.conn.Conn over a checked-out read connection: one thread hop a call."""

    __slots__ = ("_begun", "_loop", "_readers", "_slot")

    def __init__(self, readers: Readers, slot: _Slot, loop: asyncio.AbstractEventLoop
                 ) -> None:
        self._readers = readers
        self._slot = slot
        self._loop = loop
        self._begun = False

    async def _run(self, fn: ReadFn[T]) -> T:
        first = not self._begun
        self._begun = True
        return await self._loop.run_in_executor(
            self._readers._executor, self._readers._statement, self._slot, first, fn)

    async def execute(self, sql: str, params: Params = ()) -> int:
        return await self._run(lambda c: c.execute(sql, params).rowcount)

    async def executemany(self, sql: str, rows: Iterable[Params]) -> None:
        batch = list(rows)
        await self._run(lambda c: c.executemany(sql, batch))

    async def fetchall(self, sql: str, params: Params = ()) -> list[Row]:
        return await self._run(lambda c: c.execute(sql, params).fetchall())

    async def fetchone(self, sql: str, params: Params = ()) -> Row | None:
        row: Any = await self._run(lambda c: c.execute(sql, params).fetchone())
        return row
