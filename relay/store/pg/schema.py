"""PostgreSQL: connections, the schema version and migrations.

The version lives in `relay_schema` (PostgreSQL has no `user_version`); migrations
(`relay/store/sql/pg/NNN_*.sql`) run in one transaction under an advisory lock, so that
nodes starting together migrate once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from relay.errors import StoreError
from relay.store.sqlfiles import Migration, migrations

MIGRATE_LOCK = 0x64616E65  # "dane": pg_advisory_xact_lock key of migrations
SETTINGS = {"application_name": "dane-relay"}


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = (parts.username or "") + ":***"
    return urlunsplit(parts._replace(netloc=f"{user}@{netloc[-1]}"))


async def connect(url: str, *, connect_timeout: float, lock_timeout: float
                  ) -> asyncpg.Connection:
    settings = {**SETTINGS, "lock_timeout": f"{int(lock_timeout * 1000)}ms"}
    conn: Any = await asyncpg.connect(url, timeout=connect_timeout,
                                      server_settings=settings)
    return conn


async def migrate(conn: asyncpg.Connection, where: str,
                  available: Sequence[Migration] | None = None) -> list[int]:
    available = tuple(migrations("pg") if available is None else available)
    latest = available[-1].version if available else 0
    applied: list[int] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATE_LOCK)
        await conn.execute("CREATE TABLE IF NOT EXISTS relay_schema (version integer NOT NULL)")
        current = await conn.fetchval("SELECT max(version) FROM relay_schema") or 0
        if current > latest:
            raise StoreError(
                f"queue database {where} has schema version {current}, newer than this "
                f"dane-relay understands ({latest}); upgrade dane-relay")
        for mig in available:
            if mig.version <= current:
                continue
            await conn.execute(mig.sql)
            applied.append(mig.version)
        if applied:
            await conn.execute("DELETE FROM relay_schema")
            await conn.execute("INSERT INTO relay_schema (version) VALUES ($1)", applied[-1])
    return applied
