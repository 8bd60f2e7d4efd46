"""The connection the store's operations are written against, whatever the backend.

Four calls, with parameters as a mapping (`:name` in the SQL) or a sequence (positional,
for the hot intake path). relay.store.sqlite.conn and relay.store.pg.conn adapt
aiosqlite and asyncpg to it, so the store's logic (relay.store.store, .tlsrpt) is
written once and each backend only brings its own SQL (relay/store/sql/<backend>/).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

Params = Mapping[str, Any] | Sequence[Any]
Row = Sequence[Any]
T = TypeVar("T")


class Conn(Protocol):
    async def execute(self, sql: str, params: Params = ()) -> int:
        """Run one statement; the number of rows it changed."""
        ...

    async def executemany(self, sql: str, rows: Iterable[Params]) -> None: ...

    async def fetchall(self, sql: str, params: Params = ()) -> list[Row]: ...

    async def fetchone(self, sql: str, params: Params = ()) -> Row | None: ...


Op = Callable[[Conn], Awaitable[Any]]
