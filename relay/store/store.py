"""The SQLite queue store: durable intake, delivery claims and results, operator views.

One process holds one `Store`: a write connection owned by the writer task (group
commit, see relay.store.writer) and a read connection for views. Other processes (the
`relay queue` CLI) open their own `Store` on the same file; WAL lets readers run beside
the writer, and writes from two processes wait for each other (busy_timeout).
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from relay import log
from relay.errors import NotFound, StoreError
from relay.model import Envelope, RecipientStatus
from relay.store import errors as errs
from relay.store import schema
from relay.store.ids import IdGenerator, recipient_domain
from relay.store.records import (
    Attempt,
    Job,
    JobResult,
    MessageInfo,
    RecipientInfo,
    Stats,
    build_jobs,
)
from relay.store.sqlfiles import Q
from relay.store.sts import StsStore
from relay.store.tlsrpt import TlsRptStore
from relay.store.writer import Writer

T = TypeVar("T")
HEADERS_MAX = 256 * 1024  # header section kept for NDRs, at most this many octets
_ACTIVE = (RecipientStatus.QUEUED, RecipientStatus.DEFERRED)


def header_section(body: bytes) -> bytes:
    end = body.find(b"\r\n\r\n")
    head = body if end < 0 else body[: end + 2]
    return head[:HEADERS_MAX]


class Store(TlsRptStore, StsStore):
    """Open with `await Store.open(path)`; close with `await store.close()`."""

    def __init__(self, path: Path, writer: Writer, reader: aiosqlite.Connection) -> None:
        self.path = path
        self._writer = writer
        self._reader = reader
        self._ids = IdGenerator()
        self.new_work = asyncio.Event()  # set after new mail commits (and retry/release)
        self._closed = False

    # --- life cycle ---------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        path: str | os.PathLike[str],
        *,
        commit_batch: int = 512,
        busy_timeout: float = 5.0,
        max_page_count: int | None = None,
        check: bool = True,
        create: bool = True,
    ) -> Store:
        """Open (creating it and its folder if needed) and migrate the queue database.

        `check`: run `PRAGMA quick_check` first (CorruptDatabase if it fails).
        `create=False`: a missing file is an error instead of a new queue.
        `max_page_count`: a page limit for the writer (tests simulate a full disk).
        """
        db = _prepare(Path(path), create)

        async def connect_writer() -> aiosqlite.Connection:
            return await schema.connect(db, busy_timeout=busy_timeout,
                                        max_page_count=max_page_count)

        conn: aiosqlite.Connection | None = None
        reader: aiosqlite.Connection | None = None
        try:
            conn = await connect_writer()
            if check:
                await schema.quick_check(conn, db)
            await schema.migrate(conn, db)
            reader = await schema.connect(db, busy_timeout=busy_timeout, readonly=True)
        except (sqlite3.Error, OSError, StoreError) as exc:
            for c in (conn, reader):
                if c is not None:
                    await c.close()
            raise errs.open_error(exc, db) from None
        store: Store

        def on_commit(inserted: bool) -> None:
            if inserted:
                store.new_work.set()

        writer = Writer(db, connect_writer, conn, batch_max=commit_batch, on_commit=on_commit)
        store = cls(db, writer, reader)
        writer.start()
        return store

    async def close(self) -> None:
        """Finish the writes already submitted, then close both connections."""
        if self._closed:
            return
        self._closed = True
        await self._writer.close()
        await self._reader.close()

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def commits(self) -> int:
        """Transactions committed by this store's writer (group commit makes it small)."""
        return self._writer.commits

    async def set_max_page_count(self, pages: int) -> int:
        """Change the writer's page limit (a full-disk simulation for tests)."""

        async def op(conn: aiosqlite.Connection) -> int:
            return await schema.set_max_page_count(conn, pages)

        return int(await self._writer.run(op))

    # --- reads --------------------------------------------------------------------------

    async def _read(self, fn: Callable[[aiosqlite.Connection], Awaitable[T]]) -> T:
        try:
            return await fn(self._reader)
        except (sqlite3.Error, ValueError) as exc:
            raise errs.storage_error(exc, self.path) from None

    async def _fetchall(self, sql: str, params: Any = ()) -> list[sqlite3.Row]:
        async def fn(conn: aiosqlite.Connection) -> list[Any]:
            async with conn.execute(sql, params) as cur:
                return list(await cur.fetchall())

        return await self._read(fn)

    async def _fetchone(self, sql: str, params: Any = ()) -> Any:
        rows = await self._fetchall(sql, params)
        return rows[0] if rows else None

    # --- intake -------------------------------------------------------------------------

    def new_id(self, now: float) -> str:
        """A fresh queue id (sorting by arrival), for a caller that needs it before
        `enqueue`, e.g. for the Received: header."""
        return self._ids.next(now)

    async def enqueue(self, envelope: Envelope, *, now: float, qid: str | None = None) -> str:
        """Store a message; returns its queue id only after the COMMIT returned.

        Raises StorageFull (disk or page limit full) or StorageUnavailable (locked,
        read-only, I/O error); nothing of the message is then stored.
        """
        if not envelope.recipients:
            raise StoreError("a message needs at least one recipient")
        qid = qid or self._ids.next(now)
        body = envelope.body
        message = (
            qid, envelope.sender, now, len(body), body, header_section(body),
            int(envelope.smtputf8), int(envelope.body_8bit), envelope.client_ip,
            envelope.client_helo, envelope.auth_user, json.dumps(envelope.extra),
            int(envelope.requiretls),
        )
        seen: set[str] = set()
        recipients = []
        for address in envelope.recipients:
            if address in seen:
                continue
            seen.add(address)
            recipients.append((qid, address, recipient_domain(address), now, now))
        return await self._writer.insert(message, recipients, qid)

    # --- delivery -----------------------------------------------------------------------

    async def claim(
        self, *, now: float, owner: str, lease_seconds: float, limit: int,
        max_recipients: int | None = None,
    ) -> list[Job]:
        """Lease up to `limit` jobs of due recipients (one per message and domain).

        Jobs alternate between never-tried and deferred mail, oldest due first. A job
        with more than `max_recipients` recipients is split into several jobs.
        """
        params = {"now": now, "owner": owner, "until": now + lease_seconds,
                  "limit": limit, "scan": max(limit * 4, 64)}

        async def op(conn: aiosqlite.Connection) -> tuple[list[Any], list[Any]]:
            async with conn.execute(Q.claim, params) as cur:
                rows = list(await cur.fetchall())
            ids = sorted({r[1] for r in rows})
            async with conn.execute(Q.job_messages, {"ids": json.dumps(ids)}) as cur:
                msgs = list(await cur.fetchall())
            return rows, msgs

        rows, msgs = await self._writer.run(op)
        return build_jobs(rows, msgs, max_recipients)

    async def unlease(self, owner: str, recipient_ids: Iterable[int] | None = None) -> int:
        """Give leased work back at once (e.g. at shutdown); returns rows released."""
        ids = None if recipient_ids is None else json.dumps(list(recipient_ids))

        async def op(conn: aiosqlite.Connection) -> int:
            cur = await conn.execute(Q.unlease, {"owner": owner, "ids": ids})
            return cur.rowcount

        count = int(await self._writer.run(op))
        if count:
            self.new_work.set()
        return count

    async def renew_lease(self, owner: str, recipient_ids: Iterable[int], *,
                          until: float) -> int:
        """Push the lease of work still in progress forward; returns rows renewed."""
        ids = json.dumps(list(recipient_ids))

        async def op(conn: aiosqlite.Connection) -> int:
            cur = await conn.execute(Q.renew_lease, {"owner": owner, "ids": ids,
                                                     "until": until})
            return cur.rowcount

        return int(await self._writer.run(op))

    async def load_body(self, message_id: str) -> bytes:
        row = await self._fetchone(Q.load_body, {"id": message_id})
        if row is None or row[0] is None:
            raise NotFound(f"no message body for queue id {message_id}")
        return bytes(row[0])

    async def load_headers(self, message_id: str) -> bytes:
        """The original header section (kept after the body is dropped, for NDRs)."""
        row = await self._fetchone(Q.load_headers, {"id": message_id})
        if row is None:
            raise NotFound(f"no message with queue id {message_id}")
        return bytes(row[0])

    async def record(self, results: Iterable[JobResult], *, now: float) -> None:
        """Write the outcome of jobs in one transaction: recipient states, trace rows.

        Leases are cleared; a recipient that is already final is not changed (work
        whose lease expired may have been done twice); the body of a message goes when
        all its recipients are final.
        """
        results = list(results)
        updates = [
            {"id": u.recipient_id, "status": str(u.status), "code": u.code, "reply": u.reply,
             "next_attempt_at": u.next_attempt_at, "attempts": u.attempts,
             "ndr_state": u.ndr_state, "warned_at": u.warned_at, "now": now}
            for res in results for u in res.updates
        ]
        traces = [
            {"recipient_id": a.recipient_id, "at": a.at, "mx": a.mx, "ip": a.ip,
             "dnssec": a.dnssec, "tlsa": a.tlsa, "tls": a.tls, "dane": a.dane,
             "code": a.code, "reply": a.reply, "policy": a.policy}
            for res in results for a in res.attempts
        ]
        ids = json.dumps(sorted({res.message_id for res in results}))

        async def op(conn: aiosqlite.Connection) -> None:
            if traces:
                await conn.executemany(Q.insert_attempt, traces)
            if updates:
                await conn.executemany(Q.record_recipient, updates)
            await conn.execute(Q.finish_messages, {"ids": ids, "now": now})

        await self._writer.run(op)

    async def set_ndr_state(self, recipient_ids: Iterable[int], state: str, *,
                            now: float) -> None:
        rows = [{"id": rid, "ndr_state": state, "now": now} for rid in recipient_ids]

        async def op(conn: aiosqlite.Connection) -> None:
            await conn.executemany(Q.set_ndr_state, rows)

        await self._writer.run(op)

    async def next_due(self, now: float) -> float | None:
        """When the earliest claimable work is due (may be <= now); None when idle.

        Work changed by another process (`relay queue retry` from the CLI) is not
        signalled through `new_work`: sleep at most `delivery.poll_interval`.
        """
        first = await self._fetchone(Q.next_due_unleased)
        leased = await self._fetchone(Q.next_due_leased)
        times = [t for t in (first[0] if first else None, leased[0] if leased else None)
                 if t is not None]
        return min(times) if times else None

    # --- operator -----------------------------------------------------------------------

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
        msgs = await self._fetchall(Q.list_messages, params)
        ids = json.dumps([m[0] for m in msgs])
        by_msg: dict[str, list[RecipientInfo]] = {}
        for mid, address, st, rcode in await self._fetchall(Q.list_recipients, {"ids": ids}):
            by_msg.setdefault(mid, []).append(RecipientInfo(
                id=0, address=address, domain=recipient_domain(address),
                status=RecipientStatus(st), code=rcode))
        return [
            MessageInfo(id=m[0], sender=m[1], received_at=m[2], size=m[3], held=bool(m[4]),
                        finished_at=m[5], recipients=tuple(by_msg.get(m[0], ())))
            for m in msgs
        ]

    async def get_message(self, message_id: str) -> MessageInfo:
        """One message with every recipient and its attempt history (NotFound if none)."""

        async def fn(conn: aiosqlite.Connection) -> tuple[Any, list[Any], list[Any]]:
            # One read transaction, so the three queries see the same snapshot.
            await conn.execute("BEGIN")
            try:
                p = {"id": message_id}
                async with conn.execute(Q.get_message, p) as cur:
                    msg = await cur.fetchone()
                async with conn.execute(Q.get_recipients, p) as cur:
                    rcpts = list(await cur.fetchall())
                async with conn.execute(Q.get_attempts, p) as cur:
                    atts = list(await cur.fetchall())
            finally:
                await conn.execute("COMMIT")
            return msg, rcpts, atts

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
            requiretls=bool(msg[13]),
        )

    async def retry(self, message_id: str | None, *, now: float) -> int:
        """Make the queued/deferred recipients of one message (None: all) due now.

        Returns how many recipients were made due (work leased to a running attempt is
        left alone). Raises NotFound for an unknown queue id.
        """

        async def op(conn: aiosqlite.Connection) -> int:
            if message_id is None:
                cur = await conn.execute(Q.retry_all, {"now": now})
                return cur.rowcount
            async with conn.execute(Q.message_exists, {"id": message_id}) as cur:
                if await cur.fetchone() is None:
                    raise NotFound(f"no message with queue id {message_id}")
            cur = await conn.execute(Q.retry_message, {"id": message_id, "now": now})
            return cur.rowcount

        count = int(await self._writer.run(op))
        log.event("queue_op", op="retry", id=message_id or "*", count=count)
        if count:
            self.new_work.set()
        return count

    async def _change(self, name: str, sql: str, params: dict[str, Any]) -> bool:
        async def op(conn: aiosqlite.Connection) -> int:
            cur = await conn.execute(sql, params)
            return cur.rowcount

        found = int(await self._writer.run(op)) > 0
        if found:
            log.event("queue_op", op=name, id=params["id"])
        return found

    async def delete(self, message_id: str) -> bool:
        """Remove a message with its recipients and trace; False if there was none."""
        return await self._change("delete", Q.delete_message, {"id": message_id})

    async def hold(self, message_id: str) -> bool:
        """Keep a message out of delivery until released; False if there is none."""
        return await self._change("hold", Q.set_held, {"id": message_id, "held": 1})

    async def release(self, message_id: str) -> bool:
        found = await self._change("release", Q.set_held, {"id": message_id, "held": 0})
        if found:
            self.new_work.set()
        return found

    async def purge(self, *, now: float, retention: float) -> int:
        """Delete finished messages (and their trace) finished more than `retention` ago."""
        count = int(await self._writer.run(_purge_op(now - retention)))
        if count:
            log.event("purged", count=count)
        return count

    async def stats(self, *, now: float, top: int = 10) -> Stats:
        by_status = {r[0]: r[1] for r in await self._fetchall(Q.stats_by_status)}
        by_code = tuple((r[0], r[1], r[2]) for r in await self._fetchall(Q.stats_by_code))
        count, held, size, oldest = await self._fetchone(Q.stats_messages)
        (finished,) = await self._fetchone(Q.stats_finished)
        top_rows = await self._fetchall(Q.stats_top_deferred, {"limit": top})
        return Stats(now=now, by_status=by_status, by_code=by_code, messages=count,
                     held=held, bytes=size, finished=finished, oldest_received_at=oldest,
                     top_deferred_domains=tuple((r[0], r[1]) for r in top_rows))

    async def backup(self, target: str | os.PathLike[str]) -> Path:
        """A consistent copy made with SQLite's online backup API (safe while running).

        Written to a temporary file beside `target`, synced, then renamed into place.
        """
        dest = Path(target)
        tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
        try:
            await asyncio.to_thread(_backup_prepare, self.path, dest, tmp)
            target_conn = sqlite3.connect(tmp, check_same_thread=False)
            try:
                await self._reader.backup(target_conn)
                target_conn.execute("PRAGMA journal_mode = DELETE")
            finally:
                target_conn.close()
            await asyncio.to_thread(_backup_finish, tmp, dest)
        except (sqlite3.Error, OSError, ValueError) as exc:
            await asyncio.to_thread(tmp.unlink, True)
            raise errs.storage_error(exc, dest) from None
        return dest


def _prepare(db: Path, create: bool) -> Path:
    if not create and not db.exists():
        raise StoreError(f"queue database {db} does not exist (check queue.path)")
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise errs.storage_error(exc, db) from None
    return db


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


def _purge_op(cutoff: float) -> Callable[[aiosqlite.Connection], Awaitable[int]]:
    async def op(conn: aiosqlite.Connection) -> int:
        cur = await conn.execute(Q.purge, {"cutoff": cutoff})
        return cur.rowcount

    return op
