"""The delivery scheduler: claims due work, runs attempts, records outcomes, sends NDRs.

A `Component` of `relay serve` (relay.app). It claims due recipients from the store,
grouped per message and destination domain (one SMTP transaction per group), under a
lease: work held by a process that dies returns to the queue by itself when the lease
runs out. Concurrency is bounded in total (`delivery.max_connections`) and per
destination domain (`delivery.max_connections_per_domain`). New mail starts at once (the
store's `new_work` event); deferred mail when its plan point is due (relay.delivery.retry).

After each attempt every recipient is delivered, bounced (a 5xx, or its lifetime is
over: the 5.x.x form of its last code), or deferred to its next plan point. When every
recipient of a message is final, one NDR covers all of its bounced recipients (never for
a null sender); an NDR that itself fails goes once to `ndr.postmaster`, then is dropped.
An NDR (or delay warning) is queued in the same transaction that marks its recipients, so
it is queued once; one that could not be built (a storage error, a bug) stays pending and
is picked up by the sweep, at start-up and every `sweep_every` seconds while running.

Before an attempt the body is read back and checked against its digest (relay.store): a
message that fails is held with the reason (`corrupt_body` event), never sent; a job whose
body cannot be read gives its claim back at once (`job_released`), never waits for its
lease to run out.

On a queue shared by several nodes (relay.store on PostgreSQL) the lease is what keeps
them apart: the owner is `<node>/<incarnation>`, a heartbeat renews each job's lease, a
job whose lease is lost (taken over while this node stalled) or can no longer be renewed
in time opens no further SMTP transaction (`lease_lost`), and its outcome write is fenced
by the owner. A claim that takes over an expired lease logs `takeover` (the work may have
been done: a possible duplicate). Work that must run once per cluster (the purge, the
sweep) runs on the holder of a named singleton lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace

from relay.config import Config
from relay.delivery import classify, dsn, requiretls, retry
from relay.delivery.attempt import Deliverer, own_endpoints
from relay.delivery.trace import AttemptReport, policy_text
from relay.errors import CorruptMessage, LeaseLost, NotFound, StoreError
from relay.log import event
from relay.model import KIND_TLSRPT, Action, Envelope, Outcome, RecipientStatus
from relay.store import AttemptTrace, Job, JobResult, RecipientUpdate, Store
from relay.tasks import cancel_and_wait

Clock = Callable[[], float]
PURGE_EVERY = 600.0  # seconds between purges of finished messages past retention
SAFETY = 1 / 6  # of a lease: a job stops opening transactions this long before it ends
NODE_EVERY = 10.0  # seconds between a node's heartbeats in the store (`relay queue nodes`)
NODES_KEPT = 7 * 86400.0  # a node silent this long is forgotten
SWEEP_EVERY = 60.0  # seconds between sweeps for NDRs and delay warnings left pending
SWEEP_CONCURRENCY = 16  # notices built at once by a sweep
KIND_NDR = "ndr"  # extra["kind"] of an NDR we generated
KIND_POSTMASTER = "ndr-postmaster"  # a failed NDR's copy to the postmaster: dropped on failure
_STS_DETAILS = ("7.341", "7.342", "7.343")  # MTA-STS failure codes (relay.codes)


def _utc(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, dt.UTC)


def _notice_failed(message_id: str, stage: str, exc: Exception) -> None:
    """An NDR or delay warning could not be queued; it stays pending for the sweep."""
    if isinstance(exc, StoreError):
        event("storage_error", level="error", kind=stage, id=message_id, detail=str(exc))
    else:
        event("internal_error", level="error", id=message_id, stage=stage,
              error=f"{type(exc).__name__}: {exc}")


def node_owner(node: str) -> str:
    """The lease owner of this process: `<node>/<incarnation>` (a restart is another)."""
    return f"{node}/{secrets.token_hex(4)}"


class _Lease:
    """A job's lease as this node knows it: renewed at `renewed_at` (monotonic), lost when a
    renewal found it taken over."""

    __slots__ = ("lost", "monotonic", "renewed_at", "seconds")

    def __init__(self, renewed_at: float, seconds: float, monotonic: Clock) -> None:
        self.renewed_at = renewed_at
        self.seconds = seconds
        self.monotonic = monotonic
        self.lost = False

    def may_send(self) -> bool:
        """Open another SMTP transaction? Not once the lease is lost, nor when it may run
        out before the transaction ends (not renewed for 5/6 of its length)."""
        return not self.lost and \
            self.monotonic() < self.renewed_at + self.seconds * (1 - SAFETY)


class Scheduler:
    name = "delivery"

    def __init__(self, store: Store, deliverer: Deliverer, config: Config, *, hostname: str,
                 clock: Clock = time.time, owner: str | None = None,
                 own_endpoints: Callable[[], list[tuple[str, int]]] | None = None,
                 tlsrpt_record: Callable[[str, AttemptReport, float], None] | None = None,
                 sweep_every: float = SWEEP_EVERY, monotonic: Clock = time.monotonic) -> None:
        self.store = store
        self.deliverer = deliverer
        self.config = config
        self.hostname = config.ndr.reporting_mta or hostname
        self.clock = clock
        self.monotonic = monotonic
        self.node = config.queue.node or socket.gethostname()
        self.owner = owner or node_owner(self.node)
        self.started_at = clock()
        self._node_task: asyncio.Task[None] | None = None
        self._capacity = config.delivery.max_connections
        self._per_domain = config.delivery.max_connections_per_domain
        self._domains: dict[str, asyncio.Semaphore] = {}
        self._active: set[asyncio.Task[None]] = set()
        self._slot_freed = asyncio.Event()
        self._draining = False
        self._loop_task: asyncio.Task[None] | None = None
        self._ndr_locks: dict[str, asyncio.Lock] = {}
        self._last_purge = 0.0
        self.sweep_every = sweep_every
        self._last_sweep: float | None = None
        self._sweep_task: asyncio.Task[None] | None = None
        self._own_endpoints = own_endpoints
        self.tlsrpt_record = tlsrpt_record  # TLS reporting's hook (relay.tlsrpt.reporter)

    # --- component ------------------------------------------------------------------

    async def start(self) -> None:
        if self._own_endpoints is not None:  # the listener's real port (it may be 0 in config)
            ends = frozenset().union(*(own_endpoints(h, p) for h, p in self._own_endpoints()))
            self.deliverer.settings = replace(self.deliverer.settings, own_endpoints=ends)
        self._loop_task = asyncio.create_task(self._run(), name="scheduler")
        self._node_task = asyncio.create_task(self._node_heartbeat(), name="node-heartbeat")

    async def wait(self) -> None:
        assert self._loop_task is not None
        await self._loop_task
        if not self._draining:
            raise StoreError("the delivery scheduler stopped")
        await asyncio.Event().wait()  # drained on request: wait for stop()

    async def drain(self, deadline: float) -> None:
        self._draining = True
        self.store.new_work.set()
        loop = asyncio.get_running_loop()
        if self._active:
            await asyncio.wait(self._active, timeout=max(0.0, deadline - loop.time()))

    async def stop(self) -> None:
        self._draining = True
        await cancel_and_wait([self._loop_task, self._sweep_task, self._node_task,
                               *self._active])
        with contextlib.suppress(StoreError):
            await self.store.unlease(self.owner)
        await self.deliverer.close()

    # --- the loop -------------------------------------------------------------------

    async def _run(self) -> None:
        while not self._draining:
            try:
                timeout = await self._round()
            except StoreError as exc:  # e.g. locked by a backup: wait, never die
                event("storage_error", level="error", kind="scheduler", detail=str(exc))
                timeout = self.config.delivery.poll_interval
            await self._sleep(timeout)

    async def _round(self) -> float:
        """Claim what is due and can be started; returns how long to sleep at most."""
        d = self.config.delivery
        now = self.clock()
        self._maybe_sweep(now)  # first: it runs even while claims fail
        free = self._capacity - len(self._active)
        claimed = 0
        if free > 0:
            jobs = await self.store.claim(now=now, owner=self.owner, lease_seconds=d.lease,
                                          limit=free,
                                          max_recipients=d.max_recipients_per_transaction)
            for job in jobs:
                self._dispatch(job)
            claimed = len(jobs)
        if now - self._last_purge >= PURGE_EVERY:
            self._last_purge = now
            if await self.store.singleton("purge", self.owner, now=now, ttl=3 * PURGE_EVERY):
                await self.store.purge(now=now, retention=self.config.queue.trace_retention)
                await self.store.forget_nodes(before=now - NODES_KEPT)
        timeout = d.poll_interval
        if claimed < free:  # everything due was claimed: sleep until the next due time
            nxt = await self.store.next_due(self.clock())
            if nxt is not None:
                timeout = min(timeout, max(0.01, nxt - self.clock()))
        return timeout  # at capacity: a freed slot wakes the loop

    async def _sleep(self, seconds: float) -> None:
        waiters = [asyncio.ensure_future(self.store.new_work.wait()),
                   asyncio.ensure_future(self._slot_freed.wait())]
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
        self.store.new_work.clear()
        self._slot_freed.clear()

    def _dispatch(self, job: Job) -> None:
        task = asyncio.create_task(self._guarded(job), name=f"deliver {job.message_id}")
        self._active.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._active.discard(t)
            self._slot_freed.set()

        task.add_done_callback(done)

    async def _guarded(self, job: Job) -> None:
        lease = _Lease(self.monotonic(), self.config.delivery.lease, self.monotonic)
        if job.taken_from:
            event("takeover", level="warning", id=job.message_id, domain=job.domain,
                  recipients=len(job.recipients), previous=job.taken_from, owner=self.owner)
        heartbeat = asyncio.create_task(self._heartbeat(job, lease))
        try:
            await self._limited(job, lease)
        finally:
            await cancel_and_wait([heartbeat])

    async def _heartbeat(self, job: Job, lease: _Lease) -> None:
        """Renew the job's lease while it waits or runs: an attempt may legitimately take
        longer than `delivery.lease` (slow servers, many MX hosts), and work whose lease
        ran out would be claimed and delivered a second time. Fewer rows renewed than
        asked: the lease was taken over (this node stalled past it)."""
        seconds = self.config.delivery.lease
        ids = [rid for rid, _, _ in job.recipients]
        while not lease.lost:
            await asyncio.sleep(seconds / 3)
            asked = self.monotonic()
            try:
                renewed = await self.store.renew_lease(self.owner, ids, now=self.clock(),
                                                       lease=seconds)
            except StoreError:
                continue  # may_send() turns False if this lasts
            if renewed < len(ids):
                lease.lost = True
                self._lease_lost(job, "taken over by another worker")
            else:
                lease.renewed_at = asked

    def _lease_lost(self, job: Job, reason: str) -> None:
        event("lease_lost", level="warning", id=job.message_id, domain=job.domain,
              owner=self.owner, reason=reason)

    async def _node_heartbeat(self) -> None:
        """This node, seen in the store every few seconds (`relay queue nodes`)."""
        while True:
            with contextlib.suppress(StoreError):
                await self.store.node_seen(self.owner, self.node, started_at=self.started_at,
                                           now=self.clock())
            await asyncio.sleep(NODE_EVERY)

    def _maybe_sweep(self, now: float) -> None:
        """Start a sweep (in the background) at the first round and then every
        `sweep_every` seconds, unless one is still running."""
        if self._sweep_task is not None and not self._sweep_task.done():
            return
        if self._last_sweep is not None and now - self._last_sweep < self.sweep_every:
            return
        self._last_sweep = now
        self._sweep_task = asyncio.create_task(self._sweep(now), name="notice-sweep")

    async def _limited(self, job: Job, lease: _Lease) -> None:
        sem = self._domains.setdefault(job.domain, asyncio.Semaphore(self._per_domain))
        async with sem:
            try:
                await self.run_job(job, lease)
            except asyncio.CancelledError:
                raise
            except NotFound:
                return  # deleted by an operator while in flight
            except LeaseLost:
                if not lease.lost:  # not renewed in time (the store unreachable)
                    self._lease_lost(job, "could not be renewed in time")
                return  # whoever holds the work now delivers it; nothing to record
            except Exception as exc:  # a bug must not lose mail: defer, keep running
                event("internal_error", level="error", id=job.message_id, domain=job.domain,
                      error=f"{type(exc).__name__}: {exc}")
                now = self.clock()
                out = Outcome(Action.DEFERRED, "4.3.0", f"internal error: {exc}")
                with contextlib.suppress(StoreError):  # else the lease runs out: retried
                    await self.store.record(
                        [self._result(job, {}, None, now, now, default=out)], now=now,
                        owner=self.owner)

    # --- one job --------------------------------------------------------------------

    async def run_job(self, job: Job, lease: _Lease | None = None) -> None:
        started = self.clock()
        may_send = lease.may_send if lease is not None else None
        body = await self._load_body(job)
        if body is None:
            return
        addresses = [addr for _, addr, _ in job.recipients]
        # TLS report mail, and (when the operator allows it) mail marked
        # "TLS-Required: No" (RFC 8689 §5), is delivered despite DANE/MTA-STS failures;
        # REQUIRETLS wins over the header field.
        relax = job.kind == KIND_TLSRPT or (
            self.config.delivery.honor_tls_required_no and not job.requiretls
            and requiretls.tls_required_no(body))
        report = await self.deliverer.deliver(job.domain, job.sender, addresses, body,
                                              smtputf8=job.smtputf8, size=job.size,
                                              relax_dane=relax, requiretls=job.requiretls,
                                              may_send=may_send)
        if self._sts_bounce_due(job, report, started) and \
                await self.deliverer.recheck_sts(job.domain, report.plan.sts):
            # RFC 8461 §5.1: the policy changed since; one more try under the new one.
            report = await self.deliverer.deliver(job.domain, job.sender, addresses, body,
                                                  smtputf8=job.smtputf8, size=job.size,
                                                  relax_dane=relax,
                                                  requiretls=job.requiretls,
                                                  may_send=may_send)
        finished = self.clock()
        if self.tlsrpt_record is not None and job.kind != KIND_TLSRPT:
            with contextlib.suppress(Exception):  # reporting never affects delivery
                self.tlsrpt_record(job.domain, report, finished)  # shares the next commit
        self._log_hosts(job, report)
        result = self._result(job, report.outcomes, report, started, finished)
        await self.store.record([result], now=finished, owner=self.owner)
        try:  # the outcome is recorded: what follows never records it a second time
            if any(u.status is RecipientStatus.BOUNCED for u in result.updates):
                await self._maybe_ndr(job.message_id)
            elif (self.config.ndr.delay_warning is not None and job.sender
                  and any(u.status is RecipientStatus.DEFERRED for u in result.updates)):
                await self._maybe_delay_warning(job.message_id)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # left pending: the next sweep builds it
            _notice_failed(job.message_id, "notice", exc)

    async def _load_body(self, job: Job) -> bytes | None:
        """The job's body, checked against its digest; None when the job cannot go on.
        Then its claim is never left to run out: a corrupt message is held (and its lease
        given back), any other failure gives the lease back at once."""
        try:
            return await self.store.load_body(job.message_id)
        except CorruptMessage as exc:
            event("corrupt_body", level="error", id=job.message_id, domain=job.domain,
                  detail=exc.detail, action="held")
            with contextlib.suppress(StoreError):  # else the lease runs out; checked again
                await self.store.hold_corrupt(job.message_id, reason=f"corrupt: {exc.detail}",
                                              owner=self.owner)
            return None
        except NotFound as exc:  # deleted by an operator, or finished by another worker
            level, reason = "info", str(exc)
        except StoreError as exc:
            level, reason = "warning", f"body not readable: {exc}"
        event("job_released", level=level, id=job.message_id, domain=job.domain,
              reason=reason)
        with contextlib.suppress(StoreError):  # claimed again at a later round, not at once
            await self.store.unlease(self.owner, [rid for rid, _, _ in job.recipients],
                                     wake=False)
        return None

    def _sts_bounce_due(self, job: Job, report: AttemptReport, started: float) -> bool:
        """Would a recipient now bounce (5xx, or expiry) for an MTA-STS failure?"""
        d = self.config.delivery
        for _, addr, attempts in job.recipients:
            out = report.outcomes.get(addr)
            if out is None or out.code.partition(".")[2] not in _STS_DETAILS:
                continue
            if out.action is Action.BOUNCED or retry.next_attempt(
                    job.received_at, attempts + 1, started, d.retry_schedule,
                    d.max_lifetime) is None:
                return True
        return False

    def _result(self, job: Job, outcomes: dict[str, Outcome], report: AttemptReport | None,
                started: float, finished: float, *, default: Outcome | None = None,
                ) -> JobResult:
        d = self.config.delivery
        updates: list[RecipientUpdate] = []
        traces: list[AttemptTrace] = []
        for rid, addr, attempts in job.recipients:
            out = outcomes.get(addr) or default
            assert out is not None
            n = attempts + 1
            fields = {"id": job.message_id, "recipient": addr, "domain": job.domain,
                      "code": out.code, "reply": out.reply}
            if out.action is Action.DELIVERED:
                updates.append(RecipientUpdate(rid, RecipientStatus.DELIVERED, out.code,
                                               out.reply, attempts=n))
                mx = report.delivered_by.mx if report and report.delivered_by else None
                event("delivered", mx=mx, **fields)
            elif out.action is Action.BOUNCED:
                updates.append(RecipientUpdate(rid, RecipientStatus.BOUNCED, out.code, out.reply,
                                               attempts=n, ndr_state="pending"))
                event("bounced", **fields)
            else:
                nxt = retry.next_attempt(job.received_at, n, started, d.retry_schedule,
                                         d.max_lifetime)
                if nxt is None:
                    final = classify.expire(out)
                    updates.append(RecipientUpdate(rid, RecipientStatus.BOUNCED, final.code,
                                                   final.reply, attempts=n, ndr_state="pending"))
                    event("expired", **{**fields, "code": final.code})
                else:
                    updates.append(RecipientUpdate(rid, RecipientStatus.DEFERRED, out.code,
                                                   out.reply, next_attempt_at=nxt, attempts=n))
                    event("deferred", next_attempt_at=_utc(nxt).isoformat(), **fields)
            for h in report.hosts if report else ():
                traces.append(AttemptTrace(rid, at=started, mx=h.mx, ip=h.ip, dnssec=h.dnssec,
                                           tlsa=h.tlsa, tls=h.tls, dane=h.dane, code=h.code,
                                           reply=h.reply, policy=h.policy))
            if report is None or not report.hosts:
                traces.append(AttemptTrace(rid, at=started, code=out.code, reply=out.reply,
                                           dnssec=report.plan.mx_answer.security
                                           if report and report.plan.mx_answer else "",
                                           policy=policy_text(report.plan, None)
                                           if report else ""))
        return JobResult(job.message_id, tuple(updates), tuple(traces))

    def _log_hosts(self, job: Job, report: AttemptReport) -> None:
        for h in report.hosts:
            dns_failure = None
            if h.code in ("4.4.312", "4.7.324") and not h.ip:
                dns_failure = "dnssec" if h.code == "4.7.324" else "failure"
            event("attempt", id=job.message_id, domain=job.domain, mx=h.mx, ip=h.ip or None,
                  dnssec=h.dnssec, tlsa=h.tlsa, tls=h.tls or None, dane=h.dane or None,
                  security=h.security or None, code=h.code or None, policy=h.policy or None,
                  tls_version=h.tls_info.version if h.tls_info else None,
                  dns_failure=dns_failure)
        if not report.hosts and report.plan.code:
            kind = {"4.4.312": "failure", "4.7.324": "dnssec"}.get(report.plan.code)
            event("attempt", id=job.message_id, domain=job.domain, code=report.plan.code,
                  reason=report.plan.reason, dns_failure=kind)

    # --- NDRs -----------------------------------------------------------------------

    async def _sweep(self, now: float) -> None:
        """NDRs and delay warnings left pending (a crash, a storage error, a bug)."""
        ndr = self.config.ndr
        try:
            # once per cluster: the holder of the "sweep" singleton (always us on SQLite)
            if not await self.store.singleton("sweep", self.owner, now=now,
                                              ttl=3 * self.sweep_every):
                return
            todo = [(self._maybe_ndr, mid) for mid in await self.store.pending_ndrs()]
            if ndr.delay_warning is not None and ndr.enabled:
                todo += [(self._maybe_delay_warning, mid) for mid in
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
                    _notice_failed(message_id, "sweep", exc)

        await asyncio.gather(*(one(fn, mid) for fn, mid in todo))

    async def _maybe_ndr(self, message_id: str) -> None:
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
                last_attempt=_utc(r.updated_at or now))
            for r in pending
        ]
        body = dsn.build_ndr(
            original_headers=headers, envelope_sender=to, envelope_id=None,
            arrival_date=_utc(info.received_at), reporting_mta=self.hostname, failed=failed,
            now=_utc(now), message_id=f"{message_id}.ndr@{self.hostname}",
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

    async def _maybe_delay_warning(self, message_id: str) -> None:
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
        until = _utc(retry.deadline(info.received_at, d.max_lifetime))
        body = dsn.build_delay_warning(
            original_headers=await self.store.load_headers(message_id),
            envelope_sender=info.sender, envelope_id=None, arrival_date=_utc(info.received_at),
            reporting_mta=self.hostname,
            delayed=[dsn.FailedRecipient(address=r.address, status_code=r.code or "4.0.0",
                                         action="delayed", diagnostic=r.reply or None,
                                         last_attempt=_utc(r.updated_at or now))
                     for r in due],
            will_retry_until=until, now=_utc(now),
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
