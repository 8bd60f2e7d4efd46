"""The store's part of TLS reporting (RFC 8460): periods, aggregated results, reports.

A mixin of relay.store.Store (it uses the store's writer and reads). Results
are counted, not listed: recording a session is one upsert that adds 1 to the row of
its key (period, policy, MX host, result type, addresses), submitted without waiting so
that it shares the group commit of the job's own record. See sql/002_tlsrpt.sql.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from relay.model import SessionResult
from relay.store.conn import Conn
from relay.store.periods import cut_end, new_period
from relay.store.sqlfiles import Queries
from relay.store.writer import Writer


@dataclass(frozen=True)
class ReportTask:
    """A report claimed for sending."""

    id: int
    period_id: int
    policy_domain: str
    begin: float
    end: float
    due_at: float
    attempts: int


@dataclass(frozen=True)
class OpenPeriod:
    id: int
    begin: float
    end: float
    results: tuple[SessionResult, ...]


def _result(row: Sequence[Any]) -> SessionResult:
    return SessionResult(policy_domain=row[0], policy_type=row[1],
                         policy_strings=tuple(json.loads(row[2] or "[]")), mx_host=row[3],
                         result_type=row[4], sending_ip=row[5], receiving_ip=row[6],
                         detail=row[7], count=int(row[8]))


class TlsRptStore:
    """Mixed into Store: needs `_writer`, `_q`, `_fetchall` and `_read` (one snapshot)."""

    _writer: Writer
    _q: Queries
    _fetchall: Callable[..., Awaitable[list[Any]]]
    _read: Callable[..., Awaitable[Any]]

    def tlsrpt_add(self, results: Iterable[SessionResult], *, now: float,
                   interval: float) -> asyncio.Future[Any]:
        """Count `results` in the open period (opened here when there is none) — queued at
        once, committed with the next group commit; the future resolves after it."""
        batch = (list(results), now)
        return self.tlsrpt_submit(lambda: batch, interval=interval)

    def tlsrpt_submit(self, take: Callable[[], tuple[Sequence[SessionResult], float]], *,
                      interval: float) -> asyncio.Future[Any]:
        """Like `tlsrpt_add`, but the results are taken (`take()` → results and their
        time, on the event loop) when the write's transaction begins, so that everything
        recorded until then goes in one upsert: many jobs' results share one operation
        of the group commit."""

        Q = self._q

        def prepare() -> Callable[[Conn], Awaitable[int]]:
            results, now = take()  # on the event loop, when the transaction begins
            return lambda conn: op(conn, results, now)

        async def op(conn: Conn, results: Sequence[SessionResult], now: float) -> int:
            merged: dict[tuple[Any, ...], dict[str, Any]] = {}
            for r in results:
                key = (r.policy_domain, r.policy_type, r.policy_strings, r.mx_host,
                       r.result_type, r.sending_ip, r.receiving_ip)
                row = merged.get(key)
                if row is None:
                    merged[key] = {
                        "policy_domain": r.policy_domain, "policy_type": r.policy_type,
                        "policy_strings": json.dumps(list(r.policy_strings)),
                        "mx_host": r.mx_host, "result_type": r.result_type,
                        "sending_ip": r.sending_ip, "receiving_ip": r.receiving_ip,
                        "detail": r.detail, "count": r.count}
                else:
                    row["count"] += r.count
            if not merged:
                return 0
            row = await conn.fetchone(Q.tlsrpt_open_period, {"now": now})
            if row is not None:
                pid = int(row[0])
            else:
                last = await conn.fetchone(Q.tlsrpt_last_end, {})
                begin, end = new_period(now, interval, last[0] if last else None)
                # another node may open the same period at once: its row is used then
                await conn.execute(Q.tlsrpt_insert_period, {"begin": begin, "end": end})
                got = await conn.fetchone(Q.tlsrpt_period_at, {"begin": begin})
                assert got is not None
                pid = int(got[0])
            rows = list(merged.values())
            for r in rows:
                r["period_id"] = pid
            await conn.executemany(Q.tlsrpt_add_result, rows)
            return pid

        return self._writer.submit(prepare=prepare)

    async def tlsrpt_close_periods(self, *, now: float, delay: Callable[[], float],
                                   cut: bool = False) -> list[int]:
        """Close the periods that have ended (with `cut`: also the open one, ending it at
        the next whole second) and create their reports, one per policy domain, due
        `delay()` seconds after the period's end (at once with `cut`). Returns the ids of
        the periods closed."""

        Q = self._q

        async def op(conn: Conn) -> list[int]:
            periods = await conn.fetchall(Q.tlsrpt_periods_to_close,
                                          {"now": now, "cut": int(cut)})
            closed = []
            for pid, begin, end in periods:
                if cut:
                    end = max(min(end, cut_end(now)), begin + 1)
                domains = [r[0] for r in
                           await conn.fetchall(Q.tlsrpt_period_domains, {"id": pid})]
                if not await conn.execute(Q.tlsrpt_close_period,
                                          {"id": pid, "now": now, "end_at": end}):
                    continue  # closed meanwhile by another node
                for domain in domains:
                    due = now if cut else end + max(0.0, delay())
                    await conn.execute(Q.tlsrpt_insert_report, {
                        "period_id": pid, "policy_domain": domain, "begin_at": begin,
                        "end_at": end, "due_at": due, "now": now})
                closed.append(int(pid))
            return closed

        return list(await self._writer.run(op))

    async def tlsrpt_claim(self, *, now: float, owner: str, lease: float, limit: int = 50
                           ) -> list[ReportTask]:
        """Lease due pending reports (another process may be sending too)."""
        params = {"now": now, "owner": owner, "until": now + lease, "lease": lease,
                  "limit": limit, "period_id": None}

        Q = self._q

        async def op(conn: Conn) -> list[Any]:
            return await conn.fetchall(Q.tlsrpt_claim_reports, params)

        rows = await self._writer.run(op)
        return [ReportTask(int(r[0]), int(r[1]), r[2], r[3], r[4], r[5], int(r[6]))
                for r in sorted(rows, key=lambda r: (r[5], r[0]))]

    async def tlsrpt_results(self, period_id: int, policy_domain: str) -> list[SessionResult]:
        rows = await self._fetchall(self._q.tlsrpt_report_results,
                                    {"period_id": period_id, "policy_domain": policy_domain})
        return [_result(r) for r in rows]

    async def tlsrpt_sends(self, report_id: int) -> dict[str, tuple[str, str]]:
        """{uri: (state, detail)} of a report's destinations tried so far."""
        rows = await self._fetchall(self._q.tlsrpt_report_sends, {"id": report_id})
        return {r[0]: (r[1], r[2]) for r in rows}

    async def tlsrpt_set_send(self, report_id: int, uri: str, state: str, detail: str, *,
                              now: float) -> None:
        params = {"report_id": report_id, "uri": uri, "state": state, "detail": detail,
                  "at": now}

        Q = self._q

        async def op(conn: Conn) -> None:
            await conn.execute(Q.tlsrpt_set_send, params)

        await self._writer.run(op)

    async def tlsrpt_update(self, report_id: int, *, state: str, attempts: int,
                            next_attempt_at: float, rid: str, detail: str,
                            now: float) -> None:
        """Record an attempt's end (and release the lease)."""
        params = {"id": report_id, "state": state, "attempts": attempts,
                  "next_attempt_at": next_attempt_at, "report_id": rid, "detail": detail,
                  "now": now}

        Q = self._q

        async def op(conn: Conn) -> None:
            await conn.execute(Q.tlsrpt_update_report, params)

        await self._writer.run(op)

    async def tlsrpt_next_wakeup(self) -> float | None:
        """When the reporter has something to do: a period ends or a report is due."""
        Q = self._q

        async def fn(conn: Conn) -> list[Any]:
            return [await conn.fetchone(q)
                    for q in (Q.tlsrpt_next_report, Q.tlsrpt_next_period_end)]

        times = [r[0] for r in await self._read(fn) if r is not None and r[0] is not None]
        return min(times) if times else None

    async def tlsrpt_open(self) -> list[OpenPeriod]:
        """The periods still open, with what has been counted in them."""
        Q = self._q

        async def fn(conn: Conn) -> tuple[list[Any], list[Any]]:  # one snapshot
            return (await conn.fetchall(Q.tlsrpt_open_periods),
                    await conn.fetchall(Q.tlsrpt_open_results))

        period_rows, result_rows = await self._read(fn)
        periods = {int(r[0]): (r[1], r[2]) for r in period_rows}
        results: dict[int, list[SessionResult]] = {pid: [] for pid in periods}
        for r in result_rows:
            results[int(r[0])].append(_result(r[3:]))
        return [OpenPeriod(pid, b, e, tuple(results[pid])) for pid, (b, e) in periods.items()]

    async def tlsrpt_reports(self, *, limit: int = 100) -> list[dict[str, Any]]:
        """The latest reports, newest first, with their destinations."""
        out = []
        for r in await self._fetchall(self._q.tlsrpt_list_reports, {"limit": limit}):
            out.append({"id": r[0], "policy_domain": r[1], "begin": r[2], "end": r[3],
                        "due_at": r[4], "next_attempt_at": r[5], "state": r[6],
                        "attempts": r[7], "report_id": r[8], "detail": r[9],
                        "sends": json.loads(r[10] or "[]")})
        return out

    async def tlsrpt_purge(self, *, before: float) -> int:
        """Drop closed periods (results, reports, sends) closed before `before` whose
        reports are all done."""

        Q = self._q

        async def op(conn: Conn) -> int:
            return await conn.execute(Q.tlsrpt_purge, {"before": before})

        return int(await self._writer.run(op))
