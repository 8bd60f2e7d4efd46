"""The SQLite writer's connection: one sqlite3 connection, one thread, one hop a transaction.

The writer (relay.store.writer) runs a whole group commit — BEGIN, every insert and
operation, COMMIT — as one coroutine over a relay.store.conn.Conn. With SQLite that
coroutine is driven to its end inside the connection's own thread (`WriterConnection.
transaction`): `SqliteConn`'s calls run the statement at once and never suspend, so the
coroutine finishes in one `send()`, and the event loop pays one thread hand-off per
group commit instead of one per statement (aiosqlite's way: queue, wake-up, GIL,
`call_soon_threadsafe` for every execute, fetch and close; ~8 of them per delivered
message before). An operation that awaits anything but the connection is a bug here: it
fails loudly (RuntimeError) instead of blocking the thread.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from relay.store.conn import Conn, Params, Row
from relay.store.sqlite.schema import check_wal, writer_setup

T = TypeVar("T")


class SqliteConn:
    """relay.store.conn.Conn over a sqlite3 connection, for code running in its thread:
    each call runs its statement at once (the coroutine never suspends)."""

    __slots__ = ("raw",)

    def __init__(self, raw: sqlite3.Connection) -> None:
        self.raw = raw

    async def execute(self, sql: str, params: Params = ()) -> int:
        return self.raw.execute(sql, params).rowcount

    async def executemany(self, sql: str, rows: Iterable[Params]) -> None:
        self.raw.executemany(sql, rows)

    async def fetchall(self, sql: str, params: Params = ()) -> list[Row]:
        return self.raw.execute(sql, params).fetchall()

    async def fetchone(self, sql: str, params: Params = ()) -> Row | None:
        row: Any = self.raw.execute(sql, params).fetchone()
        return row


def drive(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never suspends to its end (in the calling thread)."""
    try:
        step = coro.send(None)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    coro.close()
    raise RuntimeError(f"a store operation awaited {step!r} inside a SQLite transaction; "
                       "only the connection's own calls may be awaited there")


class WriterConnection:
    """The writer's sqlite3 connection with the one thread it is used from."""

    def __init__(self, conn: sqlite3.Connection, executor: ThreadPoolExecutor) -> None:
        self.conn = conn
        self._executor = executor
        self.closed = False

    @classmethod
    async def open(cls, path: Path, *, busy_timeout: float,
                   max_page_count: int | None = None) -> WriterConnection:
        executor = ThreadPoolExecutor(1, thread_name_prefix="store-write")
        loop = asyncio.get_running_loop()
        try:
            conn = await loop.run_in_executor(executor, lambda: connect_writer(
                path, busy_timeout=busy_timeout, max_page_count=max_page_count))
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(conn, executor)

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """`fn(conn)` in the connection's thread."""
        if self.closed:
            raise sqlite3.ProgrammingError("Cannot operate on a closed database.")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, self.conn)

    async def transaction(self, body: Callable[[Conn], Awaitable[T]]) -> T:
        """`body(conn)` — a coroutine that only awaits the connection — driven to its end
        in the connection's thread: one thread hop."""
        return await self.run(lambda raw: drive(body(SqliteConn(raw))))  # type: ignore[arg-type]

    @property
    def in_transaction(self) -> bool:
        return self.conn.in_transaction

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self.conn.close)
        finally:
            self._executor.shutdown(wait=False)

    # tests look inside the writer's connection with these (as aiosqlite offers them)
    async def set_trace_callback(self, fn: Callable[[str], object] | None) -> None:
        await self.run(lambda c: c.set_trace_callback(fn))

    async def set_progress_handler(self, fn: Callable[[], int] | None, n: int) -> None:
        await self.run(lambda c: c.set_progress_handler(fn, n))


def connect_writer(path: Path, *, busy_timeout: float,
                   max_page_count: int | None = None) -> sqlite3.Connection:
    """The write connection (relay.store.sqlite.schema.writer_setup)."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=busy_timeout,
                           check_same_thread=False)
    try:
        before, after = writer_setup(busy_timeout)
        for pragma in before:
            conn.execute(pragma)
        check_wal(path, conn.execute("PRAGMA journal_mode = WAL").fetchone())
        for pragma in after:
            conn.execute(pragma)
        if max_page_count is not None:
            conn.execute(f"PRAGMA max_page_count = {int(max_page_count)}")
    except BaseException:
        conn.close()
        raise
    return conn
