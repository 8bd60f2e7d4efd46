"""The store's part of MTA-STS (RFC 8461): the policy cache, one row per domain.

A mixin of relay.store.Store (its writer and read connection). The store keeps text and
times; relay.sts parses and decides. See sql/<backend>/ (the sts_policies table).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from relay.store.conn import Conn
from relay.store.sqlfiles import Queries
from relay.store.writer import Writer


@dataclass(frozen=True)
class StsRow:
    domain: str
    policy_id: str
    policy: str  # "" when only a failure is known
    fetched_at: float | None
    expires_at: float | None
    checked_at: float | None
    failed_at: float | None
    failed_id: str
    failure: str
    failure_type: str


def _row(r: Any) -> StsRow:
    return StsRow(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9])


class StsStore:
    """Mixed into Store: needs `_writer`, `_q` and `_fetchall`."""

    _writer: Writer
    _q: Queries
    _fetchall: Callable[..., Awaitable[list[Any]]]

    async def _sts_write(self, sql: str, params: dict[str, Any]) -> None:
        async def op(conn: Conn) -> None:
            await conn.execute(sql, params)

        await self._writer.run(op)

    async def sts_get(self, domain: str) -> StsRow | None:
        rows = await self._fetchall(self._q.sts_get, {"domain": domain})
        return _row(rows[0]) if rows else None

    async def sts_put(self, domain: str, *, policy_id: str, policy: str, mode: str,
                      max_age: int, now: float) -> None:
        """A policy just fetched (clears a remembered failure)."""
        await self._sts_write(self._q.sts_put, {
            "domain": domain, "policy_id": policy_id, "policy": policy, "mode": mode,
            "max_age": max_age, "now": now, "expires_at": now + max_age})

    async def sts_fail(self, domain: str, *, policy_id: str, failure: str,
                       failure_type: str, now: float) -> None:
        """A failed fetch; a cached policy is kept."""
        await self._sts_write(self._q.sts_fail, {
            "domain": domain, "policy_id": policy_id, "failure": failure[:500],
            "failure_type": failure_type, "now": now})

    async def sts_checked(self, domain: str, *, now: float) -> None:
        await self._sts_write(self._q.sts_checked, {"domain": domain, "now": now})

    async def sts_due(self, *, now: float, checked_before: float, refresh_before: float,
                      limit: int = 100) -> list[str]:
        """Domains whose cached policy is due for a background look (see the query)."""
        rows = await self._fetchall(self._q.sts_due, {
            "now": now, "checked_before": checked_before, "refresh_before": refresh_before,
            "limit": limit})
        return [r[0] for r in rows]

    async def sts_list(self) -> list[StsRow]:
        return [_row(r) for r in await self._fetchall(self._q.sts_list)]

    async def sts_delete(self, domain: str) -> None:
        await self._sts_write(self._q.sts_delete, {"domain": domain})
