"""The store's operator views: `queue list`, `queue show`, `queue stats`.

A mixin of relay.store.Store. Each view is one read (`_read`): however many statements
it has, they see one snapshot, on a connection nobody else uses meanwhile. None of them
costs in proportion to the depth of the queue: `queue list` reads a page at a time by
queue id (keyset paging on an index), `queue stats` reads counts kept up to date by the
database (SQLite: queue_counts, maintained by triggers) or index-backed aggregates
(PostgreSQL).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from relay.errors import NotFound
from relay.model import RecipientStatus
from relay.store.conn import Conn
from relay.store.ids import recipient_domain
from relay.store.records import Attempt, MessageInfo, RecipientInfo, Stats
from relay.store.sqlfiles import Queries

T = TypeVar("T")
LIST_PAGE = 500  # messages per read of `relay queue list`


class StoreViews:
    """Mixed into Store: needs `_q` and `_read`."""

    _q: Queries
    _read: Callable[..., Awaitable[Any]]

    async def list_page(
        self, *, after: str = "", limit: int = LIST_PAGE, include_final: bool = False,
        status: str | None = None, domain: str | None = None, code: str | None = None,
        sender: str | None = None, recipient: str | None = None,
    ) -> list[MessageInfo]:
        """One page of `relay queue list`: at most `limit` messages whose queue id comes
        after `after`, in queue id (arrival) order, with their recipients (address,
        status, code). One read (one snapshot); its cost depends on the page, not on the
        depth of the queue (relay/store/sql/*/queries.sql: list_page_*).

        Without `include_final` only messages with a recipient still queued/deferred.
        The recipient filters (`status`, `domain`, `code`, `recipient`) select messages
        with at least one recipient matching all of them; `sender` the message's sender
        (both compared without regard to case).
        """
        params = {"after": after, "limit": max(1, int(limit)),
                  "include_final": int(include_final), "status": status,
                  "domain": recipient_domain("@" + domain) if domain else None,
                  "code": code, "sender": sender, "recipient": recipient}
        Q = self._q
        if status or domain or code or recipient:
            sql = Q.list_page_match
        else:
            sql = Q.list_page_all if include_final else Q.list_page_open

        async def fn(conn: Conn) -> tuple[list[Any], list[Any]]:
            msgs = await conn.fetchall(sql, params)
            if not msgs:
                return msgs, []
            ids = json.dumps([m[0] for m in msgs])
            return msgs, await conn.fetchall(Q.list_recipients, {"ids": ids})

        msgs, rcpts = await self._read(fn)
        by_msg: dict[str, list[RecipientInfo]] = {}
        for mid, address, st, rcode in rcpts:
            by_msg.setdefault(mid, []).append(RecipientInfo(
                id=0, address=address, domain=recipient_domain(address),
                status=RecipientStatus(st), code=rcode))
        return [
            MessageInfo(id=m[0], sender=m[1], received_at=m[2], size=m[3], held=bool(m[4]),
                        finished_at=m[5], held_reason=m[6] or "",
                        recipients=tuple(by_msg.get(m[0], ())))
            for m in msgs
        ]

    async def iter_messages(self, *, after: str = "", limit: int | None = None,
                            page: int = LIST_PAGE, **filters: Any
                            ) -> AsyncIterator[MessageInfo]:
        """The messages of `list_page` (same filters), page after page: at most `limit`
        (None: all of them), in bounded memory. Each page is its own snapshot: a message
        that changes while the listing runs may show its state before or after."""
        left = limit
        while left is None or left > 0:
            size = page if left is None else min(page, left)
            batch = await self.list_page(after=after, limit=size, **filters)
            for m in batch:
                yield m
            if len(batch) < size:
                return
            after = batch[-1].id
            if left is not None:
                left -= len(batch)

    async def list_messages(self, **filters: Any) -> list[MessageInfo]:
        """Every message `iter_messages` yields, as a list (for small queues and tests)."""
        return [m async for m in self.iter_messages(**filters)]

    async def get_message(self, message_id: str) -> MessageInfo:
        """One message with every recipient and its attempt history (NotFound if none)."""
        p = {"id": message_id}
        Q = self._q

        async def fn(conn: Conn) -> tuple[Any, list[Any], list[Any]]:
            return (await conn.fetchone(Q.get_message, p),
                    await conn.fetchall(Q.get_recipients, p),
                    await conn.fetchall(Q.get_attempts, p))

        msg, rcpts, atts = await self._read(fn)
        if msg is None:
            raise NotFound(f"no message with queue id {message_id}")
        history: dict[int, list[Attempt]] = {}
        for a in atts:
            history.setdefault(a[0], []).append(Attempt(*a[1:]))
        recipients = tuple(
            RecipientInfo(
                id=r[0], address=r[1], domain=r[2], status=RecipientStatus(r[3]),
                attempts=r[4], next_attempt_at=r[5], code=r[6], reply=r[7], updated_at=r[8],
                lease_owner=r[9], leased_until=r[10], ndr_state=r[11], warned_at=r[12],
                history=tuple(history.get(r[0], ())),
            )
            for r in rcpts
        )
        return MessageInfo(
            id=msg[0], sender=msg[1], received_at=msg[2], size=msg[3], held=bool(msg[4]),
            smtputf8=bool(msg[5]), body_8bit=bool(msg[6]), client_ip=msg[7],
            client_helo=msg[8], auth_user=msg[9], finished_at=msg[10],
            has_body=bool(msg[11]), extra=json.loads(msg[12] or "{}"), recipients=recipients,
            requiretls=bool(msg[13]), held_reason=msg[14] or "",
        )

    async def stats(self, *, now: float, top: int = 10) -> Stats:
        Q = self._q

        async def fn(conn: Conn) -> tuple[Any, ...]:
            return (await conn.fetchall(Q.stats_by_status),
                    await conn.fetchall(Q.stats_by_code),
                    await conn.fetchone(Q.stats_messages),
                    await conn.fetchone(Q.stats_finished),
                    await conn.fetchall(Q.stats_top_deferred, {"limit": top}))

        statuses, codes, messages, finished, top_rows = await self._read(fn)
        count, held, size, oldest = messages
        return Stats(now=now, by_status={r[0]: r[1] for r in statuses},
                     by_code=tuple((r[0], r[1], r[2]) for r in codes), messages=count,
                     held=held, bytes=size, finished=finished[0], oldest_received_at=oldest,
                     top_deferred_domains=tuple((r[0], r[1]) for r in top_rows))
