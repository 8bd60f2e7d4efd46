"""The store's read connections: a small pool, one caller per connection at a time.

Every read is one synchronous function `fn(conn)` that runs, whole, on a connection
checked out of the pool, in that connection's worker thread, inside one read transaction
(`BEGIN` … `COMMIT`): all its statements see one snapshot, and nothing else can run on
that connection meanwhile. The connection goes back to the pool only when the function
has finished and no transaction is open on it.

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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from relay.errors import StorageUnavailable
from relay.store import errors as errs

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


def fetchall(sql: str, params: Any = ()) -> ReadFn[list[Any]]:
    """A read function for one query."""
    return lambda conn: conn.execute(sql, params).fetchall()
