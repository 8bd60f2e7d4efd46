"""NDRs and delay warnings: built once a message's recipients say so, queued once.

Used by the scheduler (relay.delivery.scheduler) after it recorded an attempt, and by
its sweep for what was left pending. When every recipient of a message is final, one NDR
covers all of its bounced recipients (never for a null sender); an NDR that itself
fails goes once to `ndr.postmaster`, then is dropped. A delay warning goes once per
recipient that has waited `ndr.delay_warning` (off by default). Each is queued in the
same transaction that marks the recipients it covers (relay.store `enqueue_notice`), so
it is queued once; one that could not be built (a storage error, a bug) stays pending
and the sweep picks it up, at start-up and every `sweep_every` seconds while running.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Awaitable, Callable

from relay.config import Config
from relay.delivery import dsn, retry
from relay.errors import NotFound, StoreError
from relay.log import event
from relay.model import Envelope, RecipientStatus
from relay.store import Store

Clock = Callable[[], float]
SWEEP_CONCURRENCY = 16  # notices built at once by a sweep
KIND_NDR = "ndr"  # extra["kind"] of an NDR we generated
KIND_POSTMASTER = "ndr-postmaster"  # a failed NDR's copy to the postmaster: dropped on failure


def utc(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, dt.UTC)


def notice_failed(message_id: str, stage: str, exc: Exception) -> None:
    """An NDR or delay warning could not be queued; it stays pending for the sweep."""
    if isinstance(exc, StoreError):
        event("storage_error", level="error", kind=stage, id=message_id, detail=str(exc))
    else:
        event("internal_error", level="error", id=message_id, stage=stage,
              error=f"{type(exc).__name__}: {exc}")


class Notices:
    def __init__(self, store: Store, config: Config, *, hostname: str, owner: str,
                 clock: Clock) -> None:
        self.store = store
        self.config = config
        self.hostname = hostname
        self.owner = owner
        self.clock = clock
        self._ndr_locks: dict[str, asyncio.Lock] = {}

    async def after_attempt(self, message_id: str, *, bounced: bool, deferred: bool,
                            sender: str) -> None:
        """What an attempt's recorded outcome may call for; never raises (a notice that
        could not be queued is left pending for the sweep)."""
        try:
            if bounced:
                await self.maybe_ndr(message_id)
            elif deferred and self.config.ndr.delay_warning is not None and sender:
                await self.maybe_delay_warning(message_id)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # left pending: the next sweep builds it
            notice_failed(message_id, "notice", exc)

    async def sweep(self, now: float, every: float) -> None:
        """NDRs and delay warnings left pending (a crash, a storage error, a bug)."""
        ndr = self.config.ndr
        try:
            # once per cluster: the holder of the "sweep" singleton (always us on SQLite)
            if not await self.store.singleton("sweep", self.owner, now=now, ttl=3 * every):
                return
            todo = [(self.maybe_ndr, mid) for mid in await self.store.pending_ndrs()]
            if ndr.delay_warning is not None and ndr.enabled:
                todo += [(self.maybe_delay_warning, mid) for mid in
                         await self.store.pending_delay_warnings(before=now - ndr.delay_warning)]
        except StoreError as exc:
            event("storage_error", level="error", kind="sweep", detail=str(exc))
            return
        sem = asyncio.Semaphore(SWEEP_CONCURRENCY)

        async def one(fn: Callable[[str], Awaitable[None]], message_id: str) -> None:
            async with sem:
                try:
                    await fn(message_id)
                except NotFound:
                    pass  # deleted meanwhile
                except Exception as exc:  # tried again at the next sweep
                    notice_failed(message_id, "sweep", exc)

        await asyncio.gather(*(one(fn, mid) for fn, mid in todo))

    async def maybe_ndr(self, message_id: str) -> None:
        lock = self._ndr_locks.setdefault(message_id, asyncio.Lock())
        async with lock:
            try:
                await self._ndr(message_id)
            finally:
                if not lock.locked() or len(self._ndr_locks) > 10000:
                    self._ndr_locks.pop(message_id, None)

    async def _ndr(self, message_id: str) -> None:
        info = await self.store.get_message(message_id)
        if any(not r.status.final for r in info.recipients):
            return  # one NDR per message, when all its recipients are final
        pending = [r for r in info.recipients
                   if r.status is RecipientStatus.BOUNCED and r.ndr_state == "pending"]
        if not pending:
            return
        now = self.clock()
        ids = [r.id for r in pending]
        kind = str(info.extra.get("kind", ""))
        if info.sender:
            to = info.sender
            new_kind = KIND_NDR
        elif kind == KIND_NDR and self.config.ndr.postmaster:
            to = self.config.ndr.postmaster
            new_kind = KIND_POSTMASTER
        else:
            if kind in (KIND_NDR, KIND_POSTMASTER):
                event("bounced", level="warning", id=message_id, code=pending[0].code,
                      reply="an NDR could not be delivered; dropped")
            await self.store.set_ndr_state(ids, "none", now=now)
            return
        if not self.config.ndr.enabled:
            await self.store.set_ndr_state(ids, "none", now=now)
            return
        headers = await self.store.load_headers(message_id)
        failed = [
            dsn.FailedRecipient(
                address=r.address, status_code=r.code or "5.0.0",
                remote_mta=next((a.mx for a in reversed(r.history) if a.ip), None),
                diagnostic=r.reply or None,
                last_attempt=utc(r.updated_at or now))
            for r in pending
        ]
        body = dsn.build_ndr(
            original_headers=headers, envelope_sender=to, envelope_id=None,
            arrival_date=utc(info.received_at), reporting_mta=self.hostname, failed=failed,
            now=utc(now), message_id=f"{message_id}.ndr@{self.hostname}",
            boundary=f"{message_id}/{self.hostname}", queue_id=message_id,
            smtputf8=True if info.smtputf8 else None)  # RFC 6533 for an SMTPUTF8 message
        if body is None:
            await self.store.set_ndr_state(ids, "none", now=now)
            return
        ndr_id = await self.store.enqueue_notice(
            Envelope(sender="", recipients=(to,), body=body,
                     smtputf8=info.smtputf8 or not to.isascii(),
                     body_8bit=not body.isascii(),
                     extra={"kind": new_kind, "original": message_id}),
            now=now, kind="ndr", covers=ids)
        if ndr_id is None:
            return  # queued meanwhile by another task or process
        event("ndr_sent", id=message_id, ndr_id=ndr_id, to=to,
              recipients=len(pending), kind=new_kind)

    async def maybe_delay_warning(self, message_id: str) -> None:
        """One warning per recipient once it has waited `ndr.delay_warning` (Postfix's
        delay_warning_time); off by default."""
        now = self.clock()
        info = await self.store.get_message(message_id)
        due = [r for r in info.recipients
               if r.status is RecipientStatus.DEFERRED and retry.delay_warning_due(
                   info.received_at, now, self.config.ndr.delay_warning, r.warned_at is not None)]
        if not due or not self.config.ndr.enabled:
            return
        d = self.config.delivery
        until = utc(retry.deadline(info.received_at, d.max_lifetime))
        body = dsn.build_delay_warning(
            original_headers=await self.store.load_headers(message_id),
            envelope_sender=info.sender, envelope_id=None, arrival_date=utc(info.received_at),
            reporting_mta=self.hostname,
            delayed=[dsn.FailedRecipient(address=r.address, status_code=r.code or "4.0.0",
                                         action="delayed", diagnostic=r.reply or None,
                                         last_attempt=utc(r.updated_at or now))
                     for r in due],
            will_retry_until=until, now=utc(now),
            message_id=f"{message_id}.delay@{self.hostname}",
            boundary=f"{message_id}/delay/{self.hostname}", queue_id=message_id,
            smtputf8=True if info.smtputf8 else None)
        if body is None:
            return
        warning_id = await self.store.enqueue_notice(
            Envelope(sender="", recipients=(info.sender,), body=body,
                     smtputf8=info.smtputf8 or not info.sender.isascii(),
                     body_8bit=not body.isascii(),
                     extra={"kind": "delay-warning", "original": message_id}),
            now=now, kind="delay", covers=[r.id for r in due])
        if warning_id is None:
            return  # queued meanwhile by another task or process
        event("delay_warning", id=message_id, warning_id=warning_id, recipients=len(due))
