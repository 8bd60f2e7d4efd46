"""Recording the outcomes of delivery jobs (a mixin of relay.store.Store).

`record` is called once per finished job; calls that come while one waits for the
writer are merged into one statement per kind in the same group commit (as intake
merges its inserts), so a busy scheduler pays one round trip for many jobs.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from typing import Any

from relay.store.conn import Conn, Op
from relay.store.records import JobResult
from relay.store.sqlfiles import Queries

Pending = tuple[list[JobResult], float, str | None, "asyncio.Future[None]"]


class OutcomeRecords:
    """Mixed into Store: needs `_writer`, `_q`, `_records` and `_record_queued`."""

    _writer: Any
    _q: Queries
    _records: list[Pending]
    _record_queued: bool

    async def record(self, results: Iterable[JobResult], *, now: float,
                     owner: str | None = None) -> None:
        """Write the outcome of jobs: recipient states, trace rows; returns after COMMIT.

        Leases are cleared; a recipient that is already final is not changed (work
        whose lease expired may have been done twice); the body of a message goes when
        all its recipients are final. With `owner` the write is fenced: only recipients
        still leased to `owner` change, and only their trace is kept.

        Calls that come while one is waiting for the writer are merged: every outcome
        recorded until the transaction begins goes into one statement per kind (as
        intake merges its inserts), in the same group commit; all of them return (or
        fail) together.
        """
        fut = asyncio.get_running_loop().create_future()
        self._records.append((list(results), now, owner, fut))
        if not self._record_queued:
            self._record_queued = True
            taken: list[Pending] = []
            try:
                wfut = self._writer.submit(prepare=lambda: self._record_op(taken))
            except BaseException:
                self._record_queued = False
                self._records.remove(self._records[-1])
                raise
            wfut.add_done_callback(lambda f: self._recorded(f, taken))
        await fut

    def _record_op(self, taken: list[Pending]) -> Op:
        """Take every pending record (on the event loop, when the transaction begins)."""
        taken += self._records
        self._records = []
        self._record_queued = False
        updates = [
            {"id": u.recipient_id, "status": str(u.status), "code": u.code, "reply": u.reply,
             "next_attempt_at": u.next_attempt_at, "attempts": u.attempts,
             "ndr_state": u.ndr_state, "warned_at": u.warned_at, "now": now,
             "owner": owner}
            for results, now, owner, _ in taken for res in results for u in res.updates
        ]
        traces = [
            {"recipient_id": a.recipient_id, "at": a.at, "mx": a.mx, "ip": a.ip,
             "dnssec": a.dnssec, "tlsa": a.tlsa, "tls": a.tls, "dane": a.dane,
             "code": a.code, "reply": a.reply, "policy": a.policy, "owner": owner}
            for results, _, owner, _ in taken for res in results for a in res.attempts
        ]
        ids = json.dumps(sorted({res.message_id for results, *_ in taken for res in results}))
        now = max(t[1] for t in taken)
        Q = self._q

        async def op(conn: Conn) -> None:
            if traces:
                await conn.executemany(Q.insert_attempt, traces)
            if updates:
                await conn.executemany(Q.record_recipient, updates)
            await conn.execute(Q.finish_messages, {"ids": ids, "now": now})

        return op

    def _recorded(self, wfut: asyncio.Future[Any], taken: list[Pending]) -> None:
        if not taken:  # the batch failed before the transaction began: nothing was taken
            taken += self._records
            self._records = []
            self._record_queued = False
        error = None if wfut.cancelled() else wfut.exception()
        for *_, fut in taken:
            if fut.done():
                continue
            if wfut.cancelled():
                fut.cancel()
            elif error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(None)
