"""The store's operator views: `queue list`, `queue show`, `queue stats`, and the backup.

A mixin of relay.store.Store. Each view is one read function run by the reader pool
(relay.store.readers): however many statements it has, they see one snapshot, on a
connection nobody else uses meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from relay.errors import NotFound, StoreError
from relay.model import RecipientStatus
from relay.store import errors as errs
from relay.store.ids import recipient_domain
from relay.store.readers import Readers
from relay.store.records import Attempt, MessageInfo, RecipientInfo, Stats
from relay.store.sqlfiles import Q

T = TypeVar("T")


class StoreViews:
    """Mixed into Store: needs `path`, `_readers` and `_read`."""

    path: Path
    _readers: Readers
    _read: Callable[..., Awaitable[Any]]

    async def list_messages(
        self, *, include_final: bool = False, status: str | None = None,
        domain: str | None = None, code: str | None = None, sender: str | None = None,
        recipient: str | None = None,
    ) -> list[MessageInfo]:
        """Messages in arrival order with their recipients (address, status, code).

        Without `include_final` only messages with a recipient still queued/deferred.
        The filters select messages with at least one recipient matching all of them.
        """
        params = {"include_final": int(include_final), "status": status,
                  "domain": recipient_domain("@" + domain) if domain else None,
                  "code": code, "sender": sender, "recipient": recipient}

        def fn(conn: sqlite3.Connection) -> tuple[list[Any], list[Any]]:
            msgs = conn.execute(Q.list_messages, params).fetchall()
            ids = json.dumps([m[0] for m in msgs])
            return msgs, conn.execute(Q.list_recipients, {"ids": ids}).fetchall()

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

    async def get_message(self, message_id: str) -> MessageInfo:
        """One message with every recipient and its attempt history (NotFound if none)."""
        p = {"id": message_id}

        def fn(conn: sqlite3.Connection) -> tuple[Any, list[Any], list[Any]]:
            return (conn.execute(Q.get_message, p).fetchone(),
                    conn.execute(Q.get_recipients, p).fetchall(),
                    conn.execute(Q.get_attempts, p).fetchall())

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
        def fn(conn: sqlite3.Connection) -> tuple[Any, ...]:
            return (conn.execute(Q.stats_by_status).fetchall(),
                    conn.execute(Q.stats_by_code).fetchall(),
                    conn.execute(Q.stats_messages).fetchone(),
                    conn.execute(Q.stats_finished).fetchone(),
                    conn.execute(Q.stats_top_deferred, {"limit": top}).fetchall())

        statuses, codes, messages, finished, top_rows = await self._read(fn)
        count, held, size, oldest = messages
        return Stats(now=now, by_status={r[0]: r[1] for r in statuses},
                     by_code=tuple((r[0], r[1], r[2]) for r in codes), messages=count,
                     held=held, bytes=size, finished=finished[0], oldest_received_at=oldest,
                     top_deferred_domains=tuple((r[0], r[1]) for r in top_rows))

    async def backup(self, target: str | os.PathLike[str]) -> Path:
        """A consistent copy made with SQLite's online backup API (safe while running).

        Written to a temporary file beside `target`, synced, then renamed into place. A
        backup holds every committed transaction, also those still only in the WAL.
        """
        dest = Path(target)
        tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")

        def copy(conn: sqlite3.Connection) -> None:
            target_conn = sqlite3.connect(tmp)
            try:
                conn.backup(target_conn)
                target_conn.execute("PRAGMA journal_mode = DELETE")
            finally:
                target_conn.close()

        try:
            await asyncio.to_thread(_backup_prepare, self.path, dest, tmp)
            await self._readers.run(copy, transaction=False)
            await asyncio.to_thread(_backup_finish, tmp, dest)
        except (sqlite3.Error, OSError, ValueError) as exc:
            await asyncio.to_thread(tmp.unlink, True)
            raise errs.storage_error(exc, dest) from None
        return dest


def _backup_prepare(source: Path, dest: Path, tmp: Path) -> None:
    if dest.resolve() == source.resolve():
        raise StoreError("the backup must not overwrite the queue database itself")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp.unlink(missing_ok=True)


def _backup_finish(tmp: Path, dest: Path) -> None:
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, dest)
    dfd = os.open(dest.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
