"""The SQLite backend: one file, WAL, synchronous=FULL; one write connection owned by the
group-commit writer and a small pool of read connections, one caller each at a time
(relay.store.sqlite.readers: a read is one snapshot).

Other processes (the `relay queue` CLI) open their own backend on the same file; WAL
lets readers run beside the writer, and writes from two processes wait for each other
(busy_timeout).
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiosqlite

from relay.errors import StorageUnavailable, StoreError
from relay.store.conn import Conn, Op, T
from relay.store.sqlfiles import Queries
from relay.store.sqlite import errors as errs
from relay.store.sqlite import schema
from relay.store.sqlite.conn import SqliteConn, WriterConnection
from relay.store.sqlite.integrity import Integrity
from relay.store.sqlite.readers import Readers
from relay.store.sqlite.runstate import DAMAGED, OK, PENDING, read_state
from relay.store.writer import Writer

Q = Queries("sqlite")


class SqliteDialect:
    begin = "BEGIN IMMEDIATE"

    def __init__(self, path: Path, *, busy_timeout: float, max_page_count: int | None) -> None:
        self.path = path
        self.where = str(path)
        self.busy_timeout = busy_timeout
        self.max_page_count = max_page_count

    async def connect(self) -> WriterConnection:
        return await WriterConnection.open(self.path, busy_timeout=self.busy_timeout,
                                           max_page_count=self.max_page_count)

    def wrap(self, raw: WriterConnection) -> Conn:
        return SqliteConn(raw.conn)

    async def transaction(self, raw: WriterConnection, body: Callable[[Conn], Awaitable[T]]
                          ) -> T:
        return await raw.transaction(body)

    async def insert(self, conn: Conn, messages: list[tuple[Any, ...]],
                     recipients: list[tuple[Any, ...]]) -> None:
        await conn.executemany(Q.insert_message, messages)
        await conn.executemany(Q.insert_recipient, recipients)

    def logical(self, exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.IntegrityError | sqlite3.ProgrammingError)

    def storage_error(self, exc: BaseException) -> StoreError:
        return errs.storage_error(exc, self.path)

    def is_full(self, exc: BaseException) -> bool:
        return errs.is_full(exc)

    def needs_reopen(self, exc: BaseException) -> bool:
        return errs.needs_reopen(exc)

    async def rollback(self, raw: WriterConnection) -> bool:
        if raw.closed:
            return False

        def rollback(conn: sqlite3.Connection) -> None:
            if conn.in_transaction:
                conn.execute("ROLLBACK")

        await raw.run(rollback)
        return True

    async def close(self, raw: WriterConnection) -> None:
        await raw.close()


class WriteTurns:
    """relay.store.writer.Turn across processes: an exclusive `flock` on `<db>-wlock`,
    taken in a thread (it blocks while another process writes). The file holds nothing;
    the lock goes with the process that holds it, also when it is killed."""

    def __init__(self, db: Path) -> None:
        self.path = db.with_name(db.name + "-wlock")
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    async def acquire(self) -> None:
        await asyncio.to_thread(fcntl.flock, self._fd, fcntl.LOCK_EX)

    def release(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class SqliteBackend:
    kind = "sqlite"
    q = Q

    def __init__(self, dialect: SqliteDialect, writer: Writer, readers: Readers,
                 integrity: Integrity | None = None) -> None:
        self.dialect = dialect
        self.path = dialect.path
        self.where = dialect.where
        self.writer = writer
        self._readers = readers
        self.integrity = integrity

    @classmethod
    async def open(
        cls, path: str | os.PathLike[str], *, commit_batch: int = 512,
        busy_timeout: float = 5.0, max_page_count: int | None = None,
        check: bool | str = True, create: bool = True, readers: int = 4,
        on_commit: Callable[[bool], None] | None = None, write_turns: bool = False,
    ) -> SqliteBackend:
        """`check`: True runs `quick_check` before anything else (CorruptDatabase if it
        fails); "auto" is `relay serve`'s: only when the last run did not stop cleanly,
        and then in the background (relay.store.sqlite.integrity); False: none.
        `write_turns`: several processes of one relay write to the file (intake workers):
        their writers take turns (WriteTurns) instead of polling SQLite's lock."""
        db = _prepare(Path(path), create)
        dialect = SqliteDialect(db, busy_timeout=busy_timeout, max_page_count=max_page_count)
        setup: aiosqlite.Connection | None = None
        conn: WriterConnection | None = None
        first: sqlite3.Connection | None = None
        integrity = Integrity(db) if check == "auto" else None
        try:
            if integrity is not None:
                new = not db.exists() or db.stat().st_size == 0
                await asyncio.to_thread(integrity.plan, new=new)
            setup = await schema.connect(db, busy_timeout=busy_timeout,
                                         max_page_count=max_page_count)
            if check is True:
                await schema.quick_check(setup, db)
            await schema.migrate(setup, db)
            await setup.close()
            setup = None
            conn = await dialect.connect()
            # the first read connection, opened now so that a file that cannot be read
            # fails here; the pool opens the others when reads need them
            first = await asyncio.to_thread(schema.connect_reader, db,
                                            busy_timeout=busy_timeout)
        except (sqlite3.Error, OSError, StoreError) as exc:
            for c in (setup, conn):
                if c is not None:
                    await c.close()
            if integrity is not None:
                await integrity.close()
            raise errs.open_error(exc, db) from None
        turns = None
        if write_turns:
            try:
                turns = WriteTurns(db)
            except OSError as exc:
                await conn.close()
                raise errs.open_error(exc, db) from None
        writer = Writer(dialect, conn, batch_max=commit_batch, on_commit=on_commit,
                        turn=turns)
        pool = Readers(lambda: schema.connect_reader(db, busy_timeout=busy_timeout), readers,
                       first=first)
        writer.start()
        backend = cls(dialect, writer, pool, integrity)
        backend.turns = turns
        if integrity is not None:
            integrity.start(backend._damaged)
        return backend

    def _damaged(self, detail: str) -> None:
        """The background check found damage: no further write goes into the file."""
        self.writer.fence(StorageUnavailable(
            f"queue database {self.path} is damaged ({detail}): intake and delivery stopped"))

    async def damaged(self) -> str:
        """Returns (what is wrong) when the background integrity check finds the file
        damaged; waits for ever when it does not (or none runs)."""
        if self.integrity is None or self.integrity.damaged is None:
            await asyncio.Event().wait()
        assert self.integrity is not None and self.integrity.damaged is not None
        return await asyncio.shield(self.integrity.damaged)

    async def read(self, fn: Op) -> T:  # type: ignore[type-var]
        """`fn(conn)` in one read transaction (one snapshot) on a connection of its own."""
        try:
            return await self._readers.read(fn)  # type: ignore[arg-type]
        except (sqlite3.Error, ValueError) as exc:
            raise errs.storage_error(exc, self.path) from None

    turns: WriteTurns | None = None

    async def close(self) -> None:
        try:
            await self.writer.close()
            await self._readers.close()
        finally:
            if self.turns is not None:
                self.turns.close()
            if self.integrity is not None:
                await self.integrity.close()

    async def set_max_page_count(self, pages: int) -> int:
        """Change the writer's page limit (a full-disk simulation for tests)."""

        async def op(conn: Conn) -> int:
            assert isinstance(conn, SqliteConn)
            row = conn.raw.execute(f"PRAGMA max_page_count = {int(pages)}").fetchone()
            return int(row[0]) if row else 0

        return int(await self.writer.run(op))

    async def backup(self, target: str | os.PathLike[str]) -> Path:
        """A consistent copy made with SQLite's online backup API (safe while running).

        Written to a temporary file beside `target`, synced, then renamed into place. A
        backup holds every committed transaction, also those still only in the WAL.
        """
        dest = Path(target)
        tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")

        def copy(conn: sqlite3.Connection) -> None:
            target_conn = sqlite3.connect(tmp)
            try:
                conn.backup(target_conn)
                target_conn.execute("PRAGMA journal_mode = DELETE")
            finally:
                target_conn.close()

        try:
            await asyncio.to_thread(_backup_prepare, self.path, dest, tmp)
            await self._readers.run(copy, transaction=False)
            await asyncio.to_thread(_backup_finish, tmp, dest)
        except (sqlite3.Error, OSError, ValueError) as exc:
            await asyncio.to_thread(tmp.unlink, True)
            raise errs.storage_error(exc, dest) from None
        return dest


def _prepare(db: Path, create: bool) -> Path:
    if not create and not db.exists():
        raise StoreError(f"queue database {db} does not exist (check queue.path)")
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise errs.storage_error(exc, db) from None
    return db


def _backup_prepare(source: Path, dest: Path, tmp: Path) -> None:
    if dest.resolve() == source.resolve():
        raise StoreError("the backup must not overwrite the queue database itself")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp.unlink(missing_ok=True)


def _backup_finish(tmp: Path, dest: Path) -> None:
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, dest)
    dfd = os.open(dest.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def health(path: Path) -> tuple[bool, str]:
    """`relay health` (every 30 s in a container): the file opens read-only and its
    schema reads, and the last integrity check (relay.store.sqlite.runstate) did not
    find it damaged. No `quick_check` here: it reads the whole file (a minute at 1 M
    queued messages); `relay serve` runs it after an unclean stop."""
    if not path.exists():
        return False, f"{path}: no queue database"
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        return False, f"{path}: {exc}"
    state = read_state(path)
    if state is not None and state.check == DAMAGED:
        return False, f"{path}: found damaged {state.since}: {state.detail}"
    detail = f"{path}: schema version {version}"
    if state is not None and state.check == PENDING:
        detail += f"; integrity check owed ({state.detail or 'unclean stop'})"
    elif state is not None and state.check == OK:
        detail += "; integrity ok"
    return True, detail
