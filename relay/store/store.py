"""The SQLite queue store: durable intake, delivery claims and results, operator views.

One process holds one `Store`: a write connection owned by the writer task (group
commit, see relay.store.writer) and a small pool of read connections, one caller each at
a time (relay.store.readers). Other processes (the `relay queue` CLI) open their own
`Store` on the same file; WAL lets readers run beside the writer, and writes from two
processes wait for each other (busy_timeout).

Every body is stored with its SHA-256 (in the same INSERT, so the same transaction), and
`load_body` checks it: a body changed on disk raises CorruptMessage instead of going out.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sqlite3
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from relay import log
from relay.errors import CorruptMessage, NotFound, RelayError, StoreError
from relay.model import Envelope
from relay.store import errors as errs
from relay.store import schema
from relay.store.ids import IdGenerator, recipient_domain
from relay.store.readers import Readers, fetchall
from relay.store.records import Job, JobResult, build_jobs
from relay.store.sqlfiles import Q
from relay.store.sts import StsStore
from relay.store.tlsrpt import TlsRptStore
from relay.store.views import StoreViews
from relay.store.writer import Writer

T = TypeVar("T")
HEADERS_MAX = 256 * 1024  # header section kept for NDRs, at most this many octets
READERS = 4  # read connections per process (reads run side by side, one caller each)
HASH_IN_THREAD = 1 << 20  # bodies larger than this are hashed off the event loop


def header_section(body: bytes) -> bytes:
    end = body.find(b"\r\n\r\n")
    head = body if end < 0 else body[: end + 2]
    return head[:HEADERS_MAX]


def body_digest(body: bytes) -> bytes:
    """The digest stored with a body at intake and checked before delivery."""
    return hashlib.sha256(body).digest()


class _AlreadyDone(RelayError):
    """A notice's recipients were marked by someone else first (rolls back its insert)."""


class Store(TlsRptStore, StsStore, StoreViews):
    """Open with `await Store.open(path)`; close with `await store.close()`."""

    def __init__(self, path: Path, writer: Writer, readers: Readers) -> None:
        self.path = path
        self._writer = writer
        self._readers = readers
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
        readers: int = READERS,
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
        first: sqlite3.Connection | None = None
        try:
            conn = await connect_writer()
            if check:
                await schema.quick_check(conn, db)
            await schema.migrate(conn, db)
            # the first read connection, opened now so that a file that cannot be read
            # fails here; the pool opens the others when reads need them
            first = await asyncio.to_thread(schema.connect_reader, db,
                                            busy_timeout=busy_timeout)
        except (sqlite3.Error, OSError, StoreError) as exc:
            if conn is not None:
                await conn.close()
            raise errs.open_error(exc, db) from None
        store: Store

        def on_commit(inserted: bool) -> None:
            if inserted:
                store.new_work.set()

        writer = Writer(db, connect_writer, conn, batch_max=commit_batch, on_commit=on_commit)
        pool = Readers(lambda: schema.connect_reader(db, busy_timeout=busy_timeout), readers,
                       first=first)
        store = cls(db, writer, pool)
        writer.start()
        return store

    async def close(self) -> None:
        """Finish the writes already submitted and the reads in progress, then close."""
        if self._closed:
            return
        self._closed = True
        await self._writer.close()
        await self._readers.close()

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

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """`fn(conn)` in one read transaction (one snapshot) on a connection of its own."""
        try:
            return await self._readers.run(fn)
        except (sqlite3.Error, ValueError) as exc:
            raise errs.storage_error(exc, self.path) from None

    async def _fetchall(self, sql: str, params: Any = ()) -> list[Any]:
        return await self._read(fetchall(sql, params))

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
        qid = qid or self._ids.next(now)
        message, recipients = await self._rows(envelope, qid, now)
        return await self._writer.insert(message, recipients, qid)

    async def _rows(self, envelope: Envelope, qid: str, now: float
                    ) -> tuple[tuple[Any, ...], list[tuple[Any, ...]]]:
        """The message row (with its body's digest) and the recipient rows to insert."""
        if not envelope.recipients:
            raise StoreError("a message needs at least one recipient")
        body = envelope.body
        if len(body) > HASH_IN_THREAD:
            digest = await asyncio.to_thread(body_digest, body)
        else:
            digest = body_digest(body)
        message = (
            qid, envelope.sender, now, len(body), body, header_section(body),
            int(envelope.smtputf8), int(envelope.body_8bit), envelope.client_ip,
            envelope.client_helo, envelope.auth_user, json.dumps(envelope.extra),
            int(envelope.requiretls), digest,
        )
        seen: set[str] = set()
        recipients = []
        for address in envelope.recipients:
            if address in seen:
                continue
            seen.add(address)
            recipients.append((qid, address, recipient_domain(address), now, now))
        return message, recipients

    async def enqueue_notice(self, envelope: Envelope, *, now: float, kind: str,
                             covers: Sequence[int]) -> str | None:
        """Queue a report about other mail (kind "ndr" or "delay") and mark the recipients
        it `covers` (NDR sent / warned), in ONE transaction: a crash never leaves a report
        queued but unmarked (sent twice) or marked but not queued (never sent).

        Returns the new queue id, or None when those recipients were already marked (the
        report was queued by another task or process: nothing is inserted).
        """
        qid = self._ids.next(now)
        message, recipients = await self._rows(envelope, qid, now)
        mark = {"ndr": Q.mark_ndr_sent, "delay": Q.mark_warned}[kind]
        ids = json.dumps(sorted(set(covers)))
        want = len(set(covers))

        async def op(conn: aiosqlite.Connection) -> str:
            cur = await conn.execute(mark, {"ids": ids, "now": now})
            if cur.rowcount != want:
                raise _AlreadyDone(qid)
            await conn.execute(Q.insert_message, message)
            await conn.executemany(Q.insert_recipient, recipients)
            return qid

        try:
            queued = str(await self._writer.run(op))
        except _AlreadyDone:
            return None
        self.new_work.set()
        return queued

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

    async def unlease(self, owner: str, recipient_ids: Iterable[int] | None = None, *,
                      wake: bool = True) -> int:
        """Give leased work back at once (e.g. at shutdown); returns rows released.
        `wake=False`: do not wake the scheduler for it (work given back after a failure
        is claimed again at its next round, not in a tight loop)."""
        ids = None if recipient_ids is None else json.dumps(list(recipient_ids))

        async def op(conn: aiosqlite.Connection) -> int:
            cur = await conn.execute(Q.unlease, {"owner": owner, "ids": ids})
            return cur.rowcount

        count = int(await self._writer.run(op))
        if count and wake:
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
        """The body to deliver, checked against the digest stored at intake.

        NotFound: the message is gone, or its work was finished meanwhile (body dropped).
        CorruptMessage: the body no longer matches its digest, or is missing while
        recipients still wait for it. The check runs in the reader's thread.
        """

        def fn(conn: sqlite3.Connection) -> tuple[Any, ...] | None:
            row = conn.execute(Q.load_body, {"id": message_id}).fetchone()
            if row is None or row[0] is None or row[1] is None:
                return row
            body = bytes(row[0])
            return body, bytes(row[1]), row[2], body_digest(body)

        row = await self._read(fn)
        if row is None:
            raise NotFound(f"no message with queue id {message_id}")
        body, digest, waiting = row[0], row[1], row[2]
        if body is None:
            if not waiting:
                raise NotFound(f"message {message_id} has no recipient left to deliver to")
            raise CorruptMessage(
                f"queue database {self.path}: message {message_id} has lost its body",
                message_id=message_id, detail="body missing while recipients wait for it")
        if digest is not None and row[3] != digest:
            raise CorruptMessage(
                f"queue database {self.path}: the body of {message_id} does not match the "
                "digest stored when it was accepted", message_id=message_id,
                detail=f"body digest mismatch: stored sha256 {digest.hex()[:16]}…, "
                       f"read {row[3].hex()[:16]}… ({len(body)} octets)")
        return bytes(body)

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
        def fn(conn: sqlite3.Connection) -> list[Any]:
            return [conn.execute(q).fetchone() for q in (Q.next_due_unleased,
                                                         Q.next_due_leased)]

        times = [r[0] for r in await self._read(fn) if r is not None and r[0] is not None]
        return min(times) if times else None

    async def pending_ndrs(self, *, limit: int = 500) -> list[str]:
        """Messages whose recipients are all final and that still owe an NDR."""
        return [r[0] for r in await self._fetchall(Q.pending_ndrs, {"limit": limit})]

    async def pending_delay_warnings(self, *, before: float, limit: int = 500) -> list[str]:
        """Messages received before `before` with a deferred recipient not yet warned."""
        rows = await self._fetchall(Q.pending_delay_warnings,
                                    {"before": before, "limit": limit})
        return [r[0] for r in rows]

    # --- operator -----------------------------------------------------------------------

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

    async def hold(self, message_id: str, *, reason: str = "") -> bool:
        """Keep a message out of delivery until released; False if there is none.
        An operator's hold has no reason (shown as plain "held")."""
        return await self._change("hold", Q.set_held,
                                  {"id": message_id, "held": 1, "reason": reason})

    async def hold_corrupt(self, message_id: str, *, reason: str, owner: str) -> bool:
        """Hold a message whose body failed its check (visible in `queue list`/`show`
        with `reason`; never delivered, bounced or deleted by the relay) and give back
        `owner`'s leases on it. False if the message is gone."""

        async def op(conn: aiosqlite.Connection) -> int:
            cur = await conn.execute(Q.set_held, {"id": message_id, "held": 1,
                                                  "reason": reason})
            await conn.execute(Q.unlease_message, {"id": message_id, "owner": owner})
            return cur.rowcount

        return int(await self._writer.run(op)) > 0

    async def release(self, message_id: str) -> bool:
        found = await self._change("release", Q.set_held,
                                   {"id": message_id, "held": 0, "reason": ""})
        if found:
            self.new_work.set()
        return found

    async def purge(self, *, now: float, retention: float) -> int:
        """Delete finished messages (and their trace) finished more than `retention` ago."""
        count = int(await self._writer.run(_purge_op(now - retention)))
        if count:
            log.event("purged", count=count)
        return count


def _prepare(db: Path, create: bool) -> Path:
    if not create and not db.exists():
        raise StoreError(f"queue database {db} does not exist (check queue.path)")
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise errs.storage_error(exc, db) from None
    return db


def _purge_op(cutoff: float) -> Callable[[aiosqlite.Connection], Awaitable[int]]:
    async def op(conn: aiosqlite.Connection) -> int:
        cur = await conn.execute(Q.purge, {"cutoff": cutoff})
        return cur.rowcount

    return op
