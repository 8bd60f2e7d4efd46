"""Changes of many rows as a series of short transactions (a mixin of relay.store.Store).

`relay queue retry --all` at 1 M queued recipients was one UPDATE that held SQLite's
write lock for 3.5 to 6 s: every intake commit waited behind it, up to `busy_timeout`, and
clients got `451`. A bulk change here is a loop of transactions, each sized to hold the
lock about `BULK_TARGET` seconds, with a pause as long as the last one between two of
them, so that a writer waiting on the lock — intake in `relay serve`, while the change
runs from the CLI, another process — gets its turn. The same on PostgreSQL, where it
keeps row locks and transactions short.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from relay.store.conn import Conn
from relay.store.sqlfiles import Queries

BULK_BATCH = 2000  # rows of the first transaction of a bulk change
BULK_BATCH_MAX = 50_000
BULK_MIN = 100
BULK_TARGET = 0.1  # seconds a transaction of a bulk change should hold the write lock
PAUSE_MIN, PAUSE_MAX = 0.02, 0.5  # seconds between two transactions

Step = Callable[[Conn, int], Awaitable[tuple[int, bool]]]


class BulkChanges:
    """Mixed into Store: needs `_writer`, `_q` and `new_work`."""

    _writer: Any
    _q: Queries
    new_work: asyncio.Event

    async def _retry_all(self, now: float) -> int:
        """`retry(None)`: the recipients that exist when it starts, by id, in batches
        (mail that arrives meanwhile is due at once anyway: it is not chased)."""
        Q = self._q
        cursor = [0, 0]  # the last recipient id done, the last one to do

        async def step(conn: Conn, limit: int) -> tuple[int, bool]:
            if not cursor[1]:
                row = await conn.fetchone(Q.retry_last_id)
                cursor[1] = int(row[0]) if row is not None and row[0] is not None else -1
            row = await conn.fetchone(Q.retry_batch_end, {"after": cursor[0], "limit": limit})
            upto = None if row is None or row[0] is None else min(int(row[0]), cursor[1])
            if upto is None or upto <= cursor[0]:
                return 0, True
            count = await conn.execute(Q.retry_batch, {
                "after": cursor[0], "upto": upto, "now": now})
            cursor[0] = upto
            return count, upto >= cursor[1]

        return await self.bulk(step, progress=self.new_work.set)

    async def bulk(self, step: Step, *,
                   progress: Callable[[], None] | None = None) -> int:
        """A change of any number of rows as a series of short transactions.

        `step(conn, limit)` changes at most `limit` rows in one transaction and returns
        (rows changed, done). The limit adapts so that each transaction holds the write
        lock about `BULK_TARGET` seconds (SQLite: one writer per file, intake included);
        between two of them the store pauses as long as the last one took, so a writer
        waiting on the lock (intake in `relay serve`, beside this CLI) gets it.
        Returns the rows changed; `progress()` after each transaction that changed any.
        """
        loop = asyncio.get_running_loop()
        limit, total = BULK_BATCH, 0
        while True:
            began = loop.time()

            async def op(conn: Conn, limit: int = limit) -> tuple[int, bool]:
                return await step(conn, limit)

            count, done = await self._writer.run(op)
            total += count
            if count and progress is not None:
                progress()
            if done:
                return total
            took = loop.time() - began
            if took < BULK_TARGET / 2:
                limit = min(limit * 2, BULK_BATCH_MAX)
            elif took > BULK_TARGET * 2:
                limit = max(limit // 2, BULK_MIN)
            await asyncio.sleep(min(max(took, PAUSE_MIN), PAUSE_MAX))
