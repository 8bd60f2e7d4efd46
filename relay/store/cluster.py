"""A queue shared by several nodes (a mixin of relay.store.Store): once-per-cluster
singleton leases, the nodes' heartbeats, and moving a node's queue into another store
(`relay queue import`)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from relay.store.conn import Conn
from relay.store.sqlfiles import Queries

_MSG_COLS = ("id", "sender", "received_at", "size", "body", "headers", "smtputf8",
             "body_8bit", "client_ip", "client_helo", "auth_user", "extra", "held",
             "requiretls", "body_sha256", "held_reason")
_RCPT_COLS = ("message_id", "address", "domain", "status", "attempts", "next_attempt_at",
              "code", "reply", "updated_at", "ndr_state", "warned_at")
_ATT_COLS = ("message_id", "address", "at", "mx", "ip", "dnssec", "tlsa", "tls", "dane",
             "code", "reply", "policy")


class ClusterStore:
    """Mixed into Store: needs `_writer`, `_q`, `_read`, `_fetchall` and `new_work`."""

    _writer: Any
    _q: Queries
    new_work: Any
    _read: Callable[..., Awaitable[Any]]
    _fetchall: Callable[..., Awaitable[list[Any]]]

    # --- moving mail between queues -------------------------------------------------

    async def import_from(self, source: ClusterStore, *, batch: int = 200,
                          progress: Callable[[int, int], None] | None = None
                          ) -> tuple[int, int]:
        """Move the mail with work left from `source` into this store (`relay queue
        import`): messages, bodies, recipients with their state and plan, and the trace.
        Leases are not moved (the source's node is gone). Each batch is committed here
        before it is deleted from `source`, so a crash in between leaves a copy in both
        (moved again later: a message already here is skipped), never in neither.
        Returns (messages moved, recipients moved)."""
        moved = recipients = 0
        after: str | None = ""
        while after is not None:
            n_msgs, n_rcpts, after = await self._import_page(source, after, batch)
            moved += n_msgs
            recipients += n_rcpts
            if n_msgs:
                self.new_work.set()
            if progress is not None:
                progress(moved, recipients)
        return moved, recipients

    async def _import_page(self, source: ClusterStore, after: str, batch: int
                           ) -> tuple[int, int, str | None]:
        src, dst = source._q, self._q

        async def export(conn: Conn) -> tuple[list[Any], list[Any], list[Any]]:
            msgs = await conn.fetchall(src.export_messages, {"after": after, "limit": batch})
            ids = json.dumps([m[0] for m in msgs])
            return (msgs, await conn.fetchall(src.export_recipients, {"ids": ids}),
                    await conn.fetchall(src.export_attempts, {"ids": ids}))

        msgs, rcpts, atts = await source._read(export)
        if not msgs:
            return 0, 0, None

        async def load(conn: Conn) -> tuple[int, int]:
            new: set[str] = set()
            for m in msgs:
                row = dict(zip(_MSG_COLS, m, strict=True))
                if await conn.fetchone(dst.import_message, row) is not None:
                    new.add(m[0])
            rows = [dict(zip(_RCPT_COLS, r, strict=True)) for r in rcpts if r[0] in new]
            await conn.executemany(dst.import_recipient, rows)
            await conn.executemany(dst.import_attempt, [
                dict(zip(_ATT_COLS, a, strict=True)) for a in atts if a[0] in new])
            return len(new), len(rows)

        n_msgs, n_rcpts = await self._writer.run(load)
        ids = json.dumps([m[0] for m in msgs])

        async def drop(conn: Conn) -> None:  # only once the copy here is committed
            await conn.execute(src.export_delete, {"ids": ids})

        await source._writer.run(drop)
        return n_msgs, n_rcpts, str(msgs[-1][0])

    # --- cluster ------------------------------------------------------------------------

    async def singleton(self, name: str, owner: str, *, now: float, ttl: float) -> bool:
        """Take (or renew) the named lease for `ttl` seconds: True while `owner` holds it.
        Work that must run once per cluster runs only on the holder."""

        async def op(conn: Conn) -> bool:
            return await conn.fetchone(self._q.singleton_take, {
                "name": name, "owner": owner, "now": now, "ttl": ttl}) is not None

        return bool(await self._writer.run(op))

    async def release_singleton(self, name: str, owner: str) -> None:
        async def op(conn: Conn) -> None:
            await conn.execute(self._q.singleton_release, {"name": name, "owner": owner})

        await self._writer.run(op)

    async def singletons(self) -> list[tuple[str, str, float]]:
        return [(r[0], r[1], r[2]) for r in await self._fetchall(self._q.singleton_list)]

    async def node_seen(self, owner: str, node: str, *, started_at: float, now: float
                        ) -> None:
        """A node's heartbeat (operators see the nodes of a shared queue)."""
        params = {"owner": owner, "node": node, "started_at": started_at, "now": now}

        async def op(conn: Conn) -> None:
            await conn.execute(self._q.node_seen, params)

        await self._writer.run(op)

    async def forget_nodes(self, *, before: float) -> int:
        """Drop the nodes not seen since `before` (`relay queue nodes` forgets them)."""

        async def op(conn: Conn) -> int:
            return await conn.execute(self._q.node_forget, {"before": before})

        return int(await self._writer.run(op))

    async def nodes(self, *, now: float) -> list[dict[str, Any]]:
        """The nodes seen, with how long ago (by the database's clock where it has one)."""
        rows = await self._fetchall(self._q.node_list, {"now": now})
        return [{"owner": r[0], "node": r[1], "started_at": r[2], "seen_at": r[3],
                 "seen_ago": max(0.0, r[4] - r[3])} for r in rows]
