"""relay.store.conn.Conn over an asyncpg connection: `:name` parameters become `$n`.

The translation is done once per query text (cached); only the names a statement uses
are bound, so callers pass the same mapping to both backends. A sequence is passed as
is (positional `$n`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from functools import cache
from typing import Any

import asyncpg

from relay.store.conn import Params, Row

_NAMED = re.compile(r"'(?:[^']|'')*'|(?<![:\w]):([A-Za-z_]\w*)")  # strings stay as they are
_COUNT = re.compile(r"\s(\d+)$")


@cache
def compile_named(sql: str) -> tuple[str, tuple[str, ...]]:
    """`SELECT :a, :b, :a` → (`SELECT $1, $2, $1`, ("a", "b")). `::type` casts stay."""
    names: list[str] = []

    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        if name is None:
            return m.group(0)
        if name not in names:
            names.append(name)
        return f"${names.index(name) + 1}"

    return _NAMED.sub(sub, sql), tuple(names)


def bind(sql: str, params: Params) -> tuple[str, Sequence[Any]]:
    if isinstance(params, Mapping):
        text, names = compile_named(sql)
        return text, [params[n] for n in names]
    return sql, params


def rowcount(status: str) -> int:
    """asyncpg's command status ("UPDATE 3", "INSERT 0 1") → rows changed."""
    m = _COUNT.search(status or "")
    return int(m.group(1)) if m else 0


class PgConn:
    __slots__ = ("raw",)

    def __init__(self, raw: asyncpg.Connection) -> None:
        self.raw = raw

    async def execute(self, sql: str, params: Params = ()) -> int:
        text, args = bind(sql, params)
        return rowcount(await self.raw.execute(text, *args))

    async def executemany(self, sql: str, rows: Iterable[Params]) -> None:
        batch = [bind(sql, r) for r in rows]
        if batch:
            await self.raw.executemany(batch[0][0], [args for _, args in batch])

    async def fetchall(self, sql: str, params: Params = ()) -> list[Row]:
        text, args = bind(sql, params)
        return list(await self.raw.fetch(text, *args))

    async def fetchone(self, sql: str, params: Params = ()) -> Row | None:
        text, args = bind(sql, params)
        row: Any = await self.raw.fetchrow(text, *args)
        return row
