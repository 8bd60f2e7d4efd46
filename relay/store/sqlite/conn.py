"""relay.store.conn.Conn over an aiosqlite connection."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import aiosqlite

from relay.store.conn import Params, Row


class SqliteConn:
    __slots__ = ("raw",)

    def __init__(self, raw: aiosqlite.Connection) -> None:
        self.raw = raw

    async def execute(self, sql: str, params: Params = ()) -> int:
        cur = await self.raw.execute(sql, params)
        try:
            return cur.rowcount
        finally:
            await cur.close()

    async def executemany(self, sql: str, rows: Iterable[Params]) -> None:
        await self.raw.executemany(sql, rows)

    async def fetchall(self, sql: str, params: Params = ()) -> list[Row]:
        async with self.raw.execute(sql, params) as cur:
            return list(await cur.fetchall())

    async def fetchone(self, sql: str, params: Params = ()) -> Row | None:
        async with self.raw.execute(sql, params) as cur:
            row: Any = await cur.fetchone()
        return row
