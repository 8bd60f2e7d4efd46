"""SQLite: opening connections the one right way, the start-up check, and migrations."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path

import aiosqlite

from relay.errors import StoreError
from relay.store.sqlfiles import Migration, migrations, statements
from relay.store.sqlite import errors as errs

WAL_SIZE_LIMIT = 64 * 1024 * 1024  # bytes the WAL file is truncated to after a checkpoint


def writer_setup(busy_timeout: float) -> tuple[list[str], list[str]]:
    """The PRAGMAs of a write connection, before and after switching it to WAL (shared by
    `connect` and relay.store.sqlite.conn.connect_writer): autocommit is the caller's
    (transactions are explicit), then busy_timeout, foreign keys, WAL, synchronous=FULL and
    a WAL size limit (the WAL grows while a long reader — the background integrity check,
    a backup — keeps checkpoints from starting over; it is truncated back after that)."""
    return ([f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}", "PRAGMA foreign_keys = ON"],
            ["PRAGMA synchronous = FULL", f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}"])


def check_wal(path: Path, row: object) -> None:
    """`row`: the answer to `PRAGMA journal_mode = WAL`."""
    if not isinstance(row, tuple | sqlite3.Row) or str(row[0]).lower() != "wal":
        raise StoreError(f"queue database {path}: cannot switch to WAL mode ({row})")


async def connect(
    path: Path,
    *,
    busy_timeout: float,
    max_page_count: int | None = None,
) -> aiosqlite.Connection:
    """A write connection over aiosqlite (start-up: integrity check, migrations)."""
    conn = await aiosqlite.connect(
        path, isolation_level=None, timeout=busy_timeout, check_same_thread=False
    )
    try:
        before, after = writer_setup(busy_timeout)
        for pragma in before:
            await conn.execute(pragma)
        async with conn.execute("PRAGMA journal_mode = WAL") as cur:
            check_wal(path, await cur.fetchone())
        for pragma in after:
            await conn.execute(pragma)
        if max_page_count is not None:
            await set_max_page_count(conn, max_page_count)
    except BaseException:
        await conn.close()
        raise
    return conn


def connect_reader(path: Path, *, busy_timeout: float) -> sqlite3.Connection:
    """A read connection for relay.store.sqlite.readers: autocommit (its reads are explicit read
    transactions), `query_only`. The writer has already put the file in WAL mode."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=busy_timeout,
                           check_same_thread=False)
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        conn.execute("PRAGMA query_only = ON")
        mode = conn.execute("PRAGMA journal_mode").fetchone()
        if mode is None or str(mode[0]).lower() != "wal":
            raise StoreError(f"queue database {path} is not in WAL mode ({mode})")
    except BaseException:
        conn.close()
        raise
    return conn


async def set_max_page_count(conn: aiosqlite.Connection, pages: int) -> int:
    async with conn.execute(f"PRAGMA max_page_count = {int(pages)}") as cur:
        row = await cur.fetchone()
    return int(row[0]) if row else 0


async def quick_check(conn: aiosqlite.Connection, path: Path) -> None:
    """Refuse a corrupt database (raises CorruptDatabase naming the file)."""
    try:
        async with conn.execute("PRAGMA quick_check") as cur:
            rows = [str(r[0]) for r in await cur.fetchall()]
    except sqlite3.DatabaseError as exc:
        raise errs.corrupt(path, f"quick_check failed: {exc}") from None
    if rows != ["ok"]:
        raise errs.corrupt(path, "quick_check: " + "; ".join(rows[:5]))


async def user_version(conn: aiosqlite.Connection) -> int:
    async with conn.execute("PRAGMA user_version") as cur:
        row = await cur.fetchone()
    return int(row[0]) if row else 0


async def migrate(
    conn: aiosqlite.Connection, path: Path, available: Sequence[Migration] | None = None
) -> list[int]:
    """Apply the migrations newer than `PRAGMA user_version`, all in one transaction.

    Returns the versions applied (empty when the schema was current). A database newer
    than this code is refused rather than touched.
    """
    available = tuple(migrations("sqlite") if available is None else available)
    latest = available[-1].version if available else 0
    current = await user_version(conn)
    if current > latest:
        raise StoreError(
            f"queue database {path} has schema version {current}, newer than this "
            f"dane-relay understands ({latest}); upgrade dane-relay"
        )
    if current == latest:
        return []
    applied: list[int] = []
    await conn.execute("BEGIN IMMEDIATE")
    try:
        current = await user_version(conn)  # another process may have migrated meanwhile
        for mig in available:
            if mig.version <= current:
                continue
            for stmt in statements(mig.sql):
                await conn.execute(stmt)
            await conn.execute(f"PRAGMA user_version = {mig.version}")
            applied.append(mig.version)
        await conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            await conn.execute("ROLLBACK")
        raise
    return applied
