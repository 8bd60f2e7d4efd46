"""The queue store: durable intake, delivery claims and results, operator views.

The logic is the same on every backend; a backend (relay.store.sqlite.backend, the
embedded default, or relay.store.pg.backend, one queue for several nodes) brings the
connections, its SQL (sql/<backend>/) and its error mapping. Every write goes through
the backend's group-commit writer (relay.store.writer); every read runs in one read
transaction (one snapshot) on a connection nobody else uses meanwhile.

Every body is stored with its SHA-256 (in the same INSERT, so the same transaction), and
`load_body` checks it: a body changed on disk raises CorruptMessage instead of going out.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

from relay import log
from relay.errors import CorruptMessage, NotFound, RelayError, StoreError
from relay.model import Envelope
from relay.store.bulk import BulkChanges
from relay.store.cluster import ClusterStore
from relay.store.conn import Conn, Op
from relay.store.ids import IdGenerator, last_id_at, recipient_domain
from relay.store.outcomes import OutcomeRecords, Pending
from relay.store.records import Job, build_jobs
from relay.store.sqlfiles import Queries
from relay.store.sts import StsStore
from relay.store.tlsrpt import TlsRptStore
from relay.store.views import StoreViews
from relay.store.writer import Writer

T = TypeVar("T")
HEADERS_MAX = 256 * 1024  # header section kept for NDRs, at most this many octets
READERS = 4  # read connections per process (reads run side by side, one caller each)
HASH_IN_THREAD = 1 << 20  # bodies larger than this are hashed off the event loop
ID_CLOCK_SLACK = 60.0  # seconds a queue id's time may be later than its received_at
CLAIM_WINDOW = 20_000  # due rows a claim looks at (per kind) behind domains at their limit


def header_section(body: bytes) -> bytes:
    end = body.find(b"\r\n\r\n")
    head = body if end < 0 else body[: end + 2]
    return head[:HEADERS_MAX]


def body_digest(body: bytes) -> bytes:
    """The digest stored with a body at intake and checked before delivery."""
    return hashlib.sha256(body).digest()


async def _digest(body: bytes) -> bytes:
    if len(body) > HASH_IN_THREAD:
        return await asyncio.to_thread(body_digest, body)
    return body_digest(body)


class _AlreadyDone(RelayError):
    """A notice's recipients were marked by someone else first (rolls back its insert)."""


class Backend(Protocol):
    kind: str  # "sqlite" | "postgresql"
    where: str  # the file or the URL (without password), for messages
    q: Queries
    writer: Writer

    async def read(self, fn: Op) -> Any:
        """`fn(conn)` in one read transaction on a connection of its own."""
        ...

    async def close(self) -> None: ...


class Store(TlsRptStore, StsStore, StoreViews, BulkChanges, OutcomeRecords, ClusterStore):
    """Open with `await Store.open(path)` (SQLite), `await Store.open_url(url)`
    (PostgreSQL) or `await open_store(queue_config)`; close with `await store.close()`."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.path = Path(backend.where) if backend.kind == "sqlite" else None
        self._writer = backend.writer
        self._q = backend.q
        self._ids = IdGenerator()
        self.new_work = asyncio.Event()  # set after new mail commits (and retry/release)
        self._closed = False
        self._records: list[Pending] = []  # record() calls waiting for the writer
        self._record_queued = False

    # --- life cycle ---------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        path: str | os.PathLike[str],
        *,
        commit_batch: int = 512,
        busy_timeout: float = 5.0,
        max_page_count: int | None = None,
        check: bool | str = True,
        create: bool = True,
        readers: int = READERS,
        write_turns: bool = False,
    ) -> Store:
        """Open (creating it and its folder if needed) and migrate a SQLite queue.

        `check`: True runs `PRAGMA quick_check` first (CorruptDatabase if it fails);
        "auto" (`relay serve`) checks only after an unclean stop, in the background
        (relay.store.sqlite.integrity; `damaged()` reports what it finds); False: none.
        `create=False`: a missing file is an error instead of a new queue.
        `max_page_count`: a page limit for the writer (tests simulate a full disk).
        `write_turns`: other processes of this relay write too (intake workers): the
        writers take turns (relay.store.sqlite.backend.WriteTurns).
        """
        from relay.store.sqlite.backend import SqliteBackend

        holder: list[Store] = []
        backend = await SqliteBackend.open(
            path, commit_batch=commit_batch, busy_timeout=busy_timeout,
            max_page_count=max_page_count, check=check, create=create, readers=readers,
            on_commit=lambda inserted: holder[0]._committed(inserted) if holder else None,
            write_turns=write_turns)
        store = cls(backend)
        holder.append(store)
        return store

    @classmethod
    async def open_url(cls, url: str, *, commit_batch: int = 512, readers: int = READERS,
                       connect_timeout: float = 10.0) -> Store:
        """Open (and migrate) a queue on PostgreSQL, shared with other relay nodes."""
        from relay.store.pg.backend import PgBackend

        holder: list[Store] = []
        backend = await PgBackend.open(
            url, commit_batch=commit_batch, readers=readers, connect_timeout=connect_timeout,
            on_commit=lambda inserted: holder[0]._committed(inserted) if holder else None)
        store = cls(backend)
        holder.append(store)
        return store

    def tag_ids(self, tag: int) -> None:
        """Queue ids made here from now on carry `tag` (relay.store.ids.IdGenerator):
        processes sharing the queue with different tags never make the same id."""
        self._ids = IdGenerator(tag)

    def _committed(self, inserted: bool) -> None:
        if inserted:
            self.new_work.set()

    async def close(self) -> None:
        """Finish the writes already submitted and the reads in progress, then close."""
        if self._closed:
            return
        self._closed = True
        await self.backend.close()

    async def damaged(self) -> str:
        """What is wrong with the queue's file, once a background integrity check finds
        it damaged (its writes are refused from then on); waits for ever otherwise."""
        fn = getattr(self.backend, "damaged", None)
        if fn is None:
            await asyncio.Event().wait()
        assert fn is not None
        return str(await fn())

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def commits(self) -> int:
        """Transactions committed by this store's writer (group commit makes it small)."""
        return self._writer.commits

    async def set_max_page_count(self, pages: int) -> int:
        """Change the writer's page limit (a full-disk simulation for SQLite tests)."""
        fn = getattr(self.backend, "set_max_page_count", None)
        if fn is None:
            raise StoreError(f"{self.backend.kind}: no page limit to set")
        return int(await fn(pages))

    async def backup(self, target: str | os.PathLike[str]) -> Path:
        """A consistent copy of a SQLite queue (safe while running); see the backend."""
        fn = getattr(self.backend, "backup", None)
        if fn is None:
            raise StoreError(f"relay queue backup copies a SQLite queue; back up a "
                             f"{self.backend.kind} queue with its own tools (pg_dump, "
                             "a standby)")
        return Path(await fn(target))

    # --- reads --------------------------------------------------------------------------

    async def _read(self, fn: Callable[[Conn], Awaitable[T]]) -> T:
        """`fn(conn)` in one read transaction (one snapshot) on a connection of its own."""
        return await self.backend.read(fn)  # type: ignore[no-any-return]

    async def _fetchall(self, sql: str, params: Any = ()) -> list[Any]:
        async def fn(conn: Conn) -> list[Any]:
            return await conn.fetchall(sql, params)

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
        qid = qid or self._ids.next(now)
        message, recipients = await self._rows(envelope, qid, now)
        return await self._writer.insert(message, recipients, qid)

    async def _rows(self, envelope: Envelope, qid: str, now: float
                    ) -> tuple[tuple[Any, ...], list[tuple[Any, ...]]]:
        """The message row (with its body's digest) and the recipient rows to insert."""
        if not envelope.recipients:
            raise StoreError("a message needs at least one recipient")
        body = envelope.body
        digest = await _digest(body)
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
        mark = {"ndr": self._q.mark_ndr_sent, "delay": self._q.mark_warned}[kind]
        ids = json.dumps(sorted(set(covers)))
        want = len(set(covers))
        dialect = self._writer.dialect

        async def op(conn: Conn) -> str:
            if await conn.execute(mark, {"ids": ids, "now": now}) != want:
                raise _AlreadyDone(qid)
            await dialect.insert(conn, [message], recipients)
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
        max_recipients: int | None = None, retry_limit: int | None = None,
        caps: Mapping[str, int] | None = None, initial: int | None = None,
        dead_limit: int = 0, inline_body: int = 0,
    ) -> list[Job]:
        """Lease up to `limit` jobs of due recipients (one per message and domain).

        Jobs alternate between never-tried and deferred mail, oldest due first. A job
        with more than `max_recipients` recipients is split into several jobs.

        Per-destination limits (relay.delivery.destinations): `caps` maps a domain to
        how many more jobs it may start now (0: none; DEAD (-1): the domain is dead, and
        up to `dead_limit` of its jobs are handed out beyond `limit`, for the caller to
        defer at once); a domain not in `caps` may start `initial` (default: no limit).
        At most `retry_limit` of the `limit` jobs are deferred mail (default: all).
        `inline_body`: messages up to this size come with their body (`Job.body`, checked
        with `job_body`), so that no separate read is needed.
        """
        dead_limit = max(0, dead_limit)
        params = {"now": now, "owner": owner, "until": now + lease_seconds,
                  "lease": lease_seconds, "limit": max(0, limit),
                  "retry_limit": max(0, limit if retry_limit is None else retry_limit),
                  "caps": json.dumps(dict(caps or {})),
                  "initial": max(0, limit) if initial is None else max(0, initial),
                  "dead_limit": dead_limit, "dead_scan": dead_limit * 4,
                  "window": CLAIM_WINDOW, "scan": max(limit * 4, 64)}
        Q = self._q

        async def op(conn: Conn) -> tuple[list[Any], list[Any]]:
            rows = await conn.fetchall(Q.claim, params)
            if not rows:
                return rows, []
            ids = sorted({r[1] for r in rows})
            return rows, await conn.fetchall(Q.job_messages,
                                             {"ids": json.dumps(ids), "inline": inline_body})

        rows, msgs = await self._writer.run(op)
        return build_jobs(rows, msgs, max_recipients)

    async def job_body(self, job: Job) -> bytes:
        """The body of a claimed job, checked against its digest: the one that came with
        the claim, else read now (`load_body`). Raises as `load_body` does."""
        if job.body is None:
            return await self.load_body(job.message_id)
        return await self._checked(job.message_id, job.body, job.body_sha256)

    async def unlease(self, owner: str, recipient_ids: Iterable[int] | None = None, *,
                      wake: bool = True) -> int:
        """Give leased work back at once (e.g. at shutdown); returns rows released.
        `wake=False`: do not wake the scheduler for it (work given back after a failure
        is claimed again at its next round, not in a tight loop)."""
        ids = None if recipient_ids is None else json.dumps(list(recipient_ids))

        Q = self._q

        async def op(conn: Conn) -> int:
            return await conn.execute(Q.unlease, {"owner": owner, "ids": ids})

        count = int(await self._writer.run(op))
        if count and wake:
            self.new_work.set()
        return count

    async def renew_lease(self, owner: str, recipient_ids: Iterable[int], *, now: float,
                          lease: float) -> int:
        """Push the lease of work still in progress `lease` seconds forward (from `now`,
        or from the database's clock on a shared queue); returns rows renewed: fewer than
        asked means the lease was lost."""
        params = {"owner": owner, "ids": json.dumps(list(recipient_ids)),
                  "until": now + lease, "lease": lease}
        Q = self._q

        async def op(conn: Conn) -> int:
            return await conn.execute(Q.renew_lease, params)

        return int(await self._writer.run(op))

    async def renew_leases(self, owner: str, recipient_ids: Iterable[int], *, now: float,
                           lease: float) -> set[int]:
        """`renew_lease` for many jobs at once: the ids whose lease was renewed (an id
        missing was taken over or finished by someone else)."""
        params = {"owner": owner, "ids": json.dumps(list(recipient_ids)),
                  "until": now + lease, "lease": lease}
        Q = self._q

        async def op(conn: Conn) -> list[Any]:
            return await conn.fetchall(Q.renew_leases, params)

        return {int(r[0]) for r in await self._writer.run(op)}

    async def load_body(self, message_id: str) -> bytes:
        """The body to deliver, checked against the digest stored at intake.

        NotFound: the message is gone, or its work was finished meanwhile (body dropped).
        CorruptMessage: the body no longer matches its digest, or is missing while
        recipients still wait for it.
        """
        row = await self._fetchone(self._q.load_body, {"id": message_id})
        if row is None:
            raise NotFound(f"no message with queue id {message_id}")
        body = None if row[0] is None else bytes(row[0])
        digest = None if row[1] is None else bytes(row[1])
        waiting = row[2]
        if body is None:
            if not waiting:
                raise NotFound(f"message {message_id} has no recipient left to deliver to")
            raise CorruptMessage(
                f"queue database {self.backend.where}: message {message_id} has lost its body",
                message_id=message_id, detail="body missing while recipients wait for it")
        return await self._checked(message_id, body, digest)

    async def _checked(self, message_id: str, body: bytes | None, digest: bytes | None
                       ) -> bytes:
        if body is None:  # claimed just now: its recipients wait for it
            raise CorruptMessage(
                f"queue database {self.backend.where}: message {message_id} has lost its body",
                message_id=message_id, detail="body missing while recipients wait for it")
        body = bytes(body)
        digest = None if digest is None else bytes(digest)
        read = await _digest(body) if digest is not None else None
        if digest is not None and read != digest:
            assert read is not None
            raise CorruptMessage(
                f"queue database {self.backend.where}: the body of {message_id} does not "
                "match the digest stored when it was accepted", message_id=message_id,
                detail=f"body digest mismatch: stored sha256 {digest.hex()[:16]}…, "
                       f"read {read.hex()[:16]}… ({len(body)} octets)")
        return body

    async def load_headers(self, message_id: str) -> bytes:
        """The original header section (kept after the body is dropped, for NDRs)."""
        row = await self._fetchone(self._q.load_headers, {"id": message_id})
        if row is None:
            raise NotFound(f"no message with queue id {message_id}")
        return bytes(row[0])

    async def set_ndr_state(self, recipient_ids: Iterable[int], state: str, *,
                            now: float) -> None:
        rows = [{"id": rid, "ndr_state": state, "now": now} for rid in recipient_ids]
        Q = self._q

        async def op(conn: Conn) -> None:
            await conn.executemany(Q.set_ndr_state, rows)

        await self._writer.run(op)

    async def next_due(self, now: float) -> float | None:
        """When the earliest claimable work is due (may be <= now); None when idle.

        Work changed by another process (`relay queue retry` from the CLI) is not
        signalled through `new_work`: sleep at most `delivery.poll_interval`.
        """
        Q = self._q

        async def fn(conn: Conn) -> list[Any]:
            return [await conn.fetchone(q) for q in (Q.next_due_unleased, Q.next_due_leased)]

        times = [r[0] for r in await self._read(fn) if r is not None and r[0] is not None]
        return min(times) if times else None

    async def pending_ndrs(self, *, limit: int = 500) -> list[str]:
        """Messages whose recipients are all final and that still owe an NDR."""
        return [r[0] for r in await self._fetchall(self._q.pending_ndrs, {"limit": limit})]

    async def pending_delay_warnings(self, *, before: float, limit: int = 500) -> list[str]:
        """Messages received before `before` with a deferred recipient not yet warned.
        Reads only the recipients still owed a warning, among the messages received by
        then (a queue id range), not every deferred recipient."""
        rows = await self._fetchall(self._q.pending_delay_warnings, {
            "before": before, "before_id": last_id_at(before + ID_CLOCK_SLACK),
            "limit": limit})
        return [r[0] for r in rows]

    # --- operator -----------------------------------------------------------------------

    async def retry(self, message_id: str | None, *, now: float) -> int:
        """Make the queued/deferred recipients of one message (None: all) due now.

        Returns how many recipients were made due (work leased to a running attempt is
        left alone). Raises NotFound for an unknown queue id. All of them (`None`) are
        changed in batches (`bulk`): never one long transaction that holds intake.
        """

        Q = self._q
        if message_id is None:
            count = await self._retry_all(now)
        else:
            async def op(conn: Conn) -> int:
                if await conn.fetchone(Q.message_exists, {"id": message_id}) is None:
                    raise NotFound(f"no message with queue id {message_id}")
                return await conn.execute(Q.retry_message, {"id": message_id, "now": now})

            count = int(await self._writer.run(op))
        log.event("queue_op", op="retry", id=message_id or "*", count=count)
        if count:
            self.new_work.set()
        return count

    async def _change(self, name: str, sql: str, params: dict[str, Any]) -> bool:
        async def op(conn: Conn) -> int:
            return await conn.execute(sql, params)

        found = int(await self._writer.run(op)) > 0
        if found:
            log.event("queue_op", op=name, id=params["id"])
        return found

    async def delete(self, message_id: str) -> bool:
        """Remove a message with its recipients and trace; False if there was none."""
        return await self._change("delete", self._q.delete_message, {"id": message_id})

    async def hold(self, message_id: str, *, reason: str = "") -> bool:
        """Keep a message out of delivery until released; False if there is none.
        An operator's hold has no reason (shown as plain "held")."""
        return await self._change("hold", self._q.set_held,
                                  {"id": message_id, "held": 1, "reason": reason})

    async def hold_corrupt(self, message_id: str, *, reason: str, owner: str) -> bool:
        """Hold a message whose body failed its check (visible in `queue list`/`show`
        with `reason`; never delivered, bounced or deleted by the relay) and give back
        `owner`'s leases on it. False if the message is gone."""

        Q = self._q

        async def op(conn: Conn) -> int:
            count = await conn.execute(self._q.set_held, {"id": message_id, "held": 1,
                                                    "reason": reason})
            await conn.execute(Q.unlease_message, {"id": message_id, "owner": owner})
            return count

        return int(await self._writer.run(op)) > 0

    async def release(self, message_id: str) -> bool:
        found = await self._change("release", self._q.set_held,
                                   {"id": message_id, "held": 0, "reason": ""})
        if found:
            self.new_work.set()
        return found

    async def purge(self, *, now: float, retention: float) -> int:
        """Delete finished messages (and their trace) finished more than `retention` ago,
        in batches (`bulk`)."""
        cutoff = now - retention
        Q = self._q

        async def step(conn: Conn, limit: int) -> tuple[int, bool]:
            # a message is several rows (recipients, trace): fewer messages per batch
            limit = max(1, limit // 8)
            count = await conn.execute(Q.purge, {"cutoff": cutoff, "limit": limit})
            if count < limit:
                await conn.execute(Q.counts_prune)
            return count, count < limit

        count = await self.bulk(step)
        if count:
            log.event("purged", count=count)
        return count

