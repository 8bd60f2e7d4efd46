"""Store fixtures for the contract suite: every test runs on SQLite and on a real
PostgreSQL (tests/support/pgserver.py, one private server per test session, a fresh
database per test).

    pg_server = pg_server_fixture()
    store = store_fixture()

    async def test_x(store: Store, clock: StoreClock) -> None: ...

`clock.now` is the node's time passed to the store (a fake, like the scheduler's);
`await clock.lease_passes(s)` lets a lease of `s` seconds run out: SQLite judges leases
by the node's time, PostgreSQL by the database's own clock, so there it really waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from relay.store import Store
from tests.support.pgserver import PgServer, available

BACKENDS = ("sqlite", "pg")
_DB = itertools.count()


def pg_server_fixture() -> Any:
    """A session-wide private PostgreSQL server: `pg_server = pg_server_fixture()`."""

    @pytest.fixture(scope="session")  # type: ignore[misc]
    def _fixture() -> Iterator[PgServer]:
        why = available()
        if why:
            pytest.fail(f"PostgreSQL is needed here: {why}")
        root = Path(tempfile.mkdtemp(prefix="relay-pg-"))
        os.chmod(root, 0o755)  # the server runs as the postgres user
        pg = PgServer(root)
        pg.start()
        try:
            yield pg
        finally:
            pg.destroy()
            with contextlib.suppress(OSError):
                root.rmdir()

    return _fixture


class StoreClock:
    def __init__(self, backend: str, now: float) -> None:
        self.backend = backend
        self.now = now

    async def lease_passes(self, seconds: float) -> None:
        self.now += seconds
        if self.backend == "pg":
            await asyncio.sleep(seconds + 0.05)


async def open_backend(kind: str, where: Path, request: pytest.FixtureRequest,
                       **kw: Any) -> Store:
    if kind == "pg":
        pg: PgServer = request.getfixturevalue("pg_server")
        url = pg.create_db(f"relay_{os.getpid()}_{next(_DB)}")
        return await Store.open_url(url, **kw)
    return await Store.open(where / "relay.db", **kw)


def store_fixture() -> Any:
    """An open store, once per backend: `store = store_fixture()` (with `pg_server`)."""

    @pytest.fixture(params=BACKENDS)  # type: ignore[misc]
    async def _fixture(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
        s = await open_backend(request.param, tmp_path, request)
        yield s
        await s.close()

    return _fixture


async def raw(store: Store, sql: str, params: Any = ()) -> list[tuple[Any, ...]]:
    """Rows of a plain SELECT that reads the same on both backends."""

    async def fn(conn: Any) -> list[Any]:
        return await conn.fetchall(sql, params)

    return [tuple(r) for r in await store.backend.read(fn)]
