"""The PostgreSQL backend: a queue shared by several relay nodes.

Writes of this node go through the same group-commit writer as SQLite's (one connection;
accepted messages of many sessions share one COMMIT; `250` only after it); reads take a
connection from a small pool and run in one read-only REPEATABLE READ transaction (one
snapshot). Claims lock rows with FOR UPDATE SKIP LOCKED, so nodes never take the same
work; leases and due times use the database's clock. When the server is unreachable,
writes fail with StorageUnavailable (intake answers 451) and the next batch reconnects.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from relay.errors import StoreError
from relay.store.conn import Conn, Op, T
from relay.store.pg import errors as errs
from relay.store.pg import schema
from relay.store.pg.conn import PgConn
from relay.store.sqlfiles import Queries
from relay.store.writer import Writer

Q = Queries("pg")


class PgDialect:
    begin = "BEGIN"

    def __init__(self, url: str, *, connect_timeout: float, lock_timeout: float) -> None:
        self.url = url
        self.where = schema.redact(url)
        self.connect_timeout = connect_timeout
        self.lock_timeout = lock_timeout

    async def connect(self) -> asyncpg.Connection:
        try:
            return await schema.connect(self.url, connect_timeout=self.connect_timeout,
                                        lock_timeout=self.lock_timeout)
        except (OSError, TimeoutError, asyncpg.PostgresError,
                asyncpg.exceptions.InterfaceError) as exc:
            raise errs.storage_error(exc, self.where) from None

    def wrap(self, raw: asyncpg.Connection) -> Conn:
        return PgConn(raw)

    async def transaction(self, raw: asyncpg.Connection,
                          body: Callable[[Conn], Awaitable[T]]) -> T:
        return await body(PgConn(raw))

    async def insert(self, conn: Conn, messages: list[tuple[Any, ...]],
                     recipients: list[tuple[Any, ...]]) -> None:
        # the message tuple is SQLite's row: (id, sender, received_at, size, body, headers,
        # smtputf8, body_8bit, client_ip, client_helo, auth_user, extra)
        await conn.executemany(Q.insert_message, [m[:4] + m[5:] for m in messages])
        await conn.executemany(Q.insert_body, [(m[0], m[4]) for m in messages])
        await conn.executemany(Q.insert_recipient, recipients)

    def logical(self, exc: BaseException) -> bool:
        return errs.logical(exc)

    def storage_error(self, exc: BaseException) -> StoreError:
        return errs.storage_error(exc, self.where)

    def is_full(self, exc: BaseException) -> bool:
        return errs.is_full(exc)

    def needs_reopen(self, exc: BaseException) -> bool:
        return errs.needs_reopen(exc)

    async def rollback(self, raw: asyncpg.Connection) -> bool:
        if raw.is_closed():
            return False
        if raw.is_in_transaction():
            await raw.execute("ROLLBACK")
        return True

    async def close(self, raw: asyncpg.Connection) -> None:
        try:
            await raw.close(timeout=5)
        except Exception:
            raw.terminate()


class PgBackend:
    kind = "postgresql"
    q = Q

    def __init__(self, dialect: PgDialect, writer: Writer, pool: asyncpg.Pool) -> None:
        self.dialect = dialect
        self.where = dialect.where
        self.writer = writer
        self._pool = pool

    @classmethod
    async def open(
        cls, url: str, *, commit_batch: int = 512, connect_timeout: float = 10.0,
        lock_timeout: float = 5.0, readers: int = 4,
        on_commit: Callable[[bool], None] | None = None,
    ) -> PgBackend:
        dialect = PgDialect(url, connect_timeout=connect_timeout, lock_timeout=lock_timeout)
        conn = await dialect.connect()
        pool: Any = None
        try:
            await schema.migrate(conn, dialect.where)
            pool = await asyncpg.create_pool(
                url, min_size=1, max_size=max(1, readers), timeout=connect_timeout,
                server_settings=schema.SETTINGS)
        except (OSError, TimeoutError, asyncpg.PostgresError,
                asyncpg.exceptions.InterfaceError, StoreError) as exc:
            await dialect.close(conn)
            raise errs.storage_error(exc, dialect.where) from None
        writer = Writer(dialect, conn, batch_max=commit_batch, on_commit=on_commit)
        writer.start()
        return cls(dialect, writer, pool)

    async def read(self, fn: Op) -> T:  # type: ignore[type-var]
        try:
            async with self._pool.acquire() as raw, raw.transaction(
                    isolation="repeatable_read", readonly=True):
                return await fn(PgConn(raw))  # type: ignore[no-any-return]
        except (OSError, TimeoutError, asyncpg.PostgresError,
                asyncpg.exceptions.InterfaceError) as exc:
            raise errs.storage_error(exc, self.where) from None

    async def close(self) -> None:
        await self.writer.close()
        try:
            await self._pool.close()
        except Exception:
            self._pool.terminate()


async def health(url: str, *, wait: float = 5.0) -> tuple[bool, str]:
    """`relay health`: the server answers and holds a migrated queue."""
    where = schema.redact(url)
    try:
        conn = await schema.connect(url, connect_timeout=wait, lock_timeout=wait)
        try:
            version = await conn.fetchval("SELECT max(version) FROM relay_schema")
        finally:
            await conn.close(timeout=wait)
    except (OSError, TimeoutError, asyncpg.PostgresError,
            asyncpg.exceptions.InterfaceError, StoreError) as exc:
        return False, f"{where}: {type(exc).__name__}: {exc}"
    return True, f"{where}: schema version {version}"
