"""The delivery scheduler: claims due work, runs attempts, records outcomes.

A `Component` of `relay serve` (relay.app). It claims due recipients from the store,
grouped per message and destination domain (one SMTP transaction per group), under a
lease: work held by a process that dies returns to the queue by itself when the lease
runs out. New mail starts at once (the store's `new_work` event); deferred mail when its
plan point is due (relay.delivery.retry).

How the work is shared (Postfix's queue manager; docs/mail-flow.md):
- at most `delivery.max_connections` attempts at once; deferred mail may use all but
  `delivery.reserved_connections` of them, so new mail always finds a slot while a wave
  of retries waits on slow or dead destinations; new and deferred mail take turns in
  each claim;
- per destination domain, a concurrency window (relay.delivery.destinations: slow start
  from `initial_connections_per_domain` up to `max_connections_per_domain`, one less
  after each site failure). The claim hands out no work for a domain at its window, so
  no claimed job ever waits for a domain while holding a slot;
- a domain whose first connections all failed is *dead* for `dead_destination_time`:
  the claim still hands out its due work, and the scheduler defers it at once with the
  failure's code ("delivery temporarily suspended"), without a connection or a slot, to
  its first plan point after the dead time. Then one connection probes the domain.
On a queue shared by several nodes this state is each node's own: N nodes may open up
to N times max_connections_per_domain connections to one domain, and each learns for itself
that a destination is dead.

After each attempt every recipient is delivered, bounced (a 5xx, or its lifetime is
over: the 5.x.x form of its last code), or deferred to its next plan point; outcomes of
jobs that finish together share one write (relay.store `record`). NDRs and delay
warnings follow (relay.delivery.notices), with a sweep for those left pending.

Before an attempt the body (it comes with the claim for messages up to `INLINE_BODY`
octets) is checked against its digest (relay.store): a message that fails is held with
the reason (`corrupt_body` event), never sent; a job whose body cannot be read gives its
claim back at once (`job_released`), never waits for its lease to run out.

On a queue shared by several nodes (relay.store on PostgreSQL) the lease is what keeps
them apart: the owner is `<node>/<incarnation>`, one heartbeat task renews the leases of
the jobs that run longer than a third of it, a job whose lease is lost (taken over while
this node stalled) or can no longer be renewed in time opens no further SMTP transaction
(`lease_lost`), and its outcome write is fenced by the owner. A claim that takes over an
expired lease logs `takeover` (the work may have been done: a possible duplicate). Work
that must run once per cluster (the purge, the sweep) runs on the holder of a named
singleton lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from relay.config import Config
from relay.delivery import requiretls
from relay.delivery.attempt import Deliverer, own_endpoints
from relay.delivery.destinations import DEAD, Change, DeadSite, Feedback, Sites, feedback
from relay.delivery.notices import Notices, utc
from relay.delivery.results import job_result, log_hosts, sts_bounce_due
from relay.delivery.trace import AttemptReport
from relay.errors import CorruptMessage, LeaseLost, NotFound, StoreError
from relay.log import event
from relay.model import KIND_TLSRPT, Action, Outcome, RecipientStatus
from relay.store import Job, Store
from relay.tasks import cancel_and_wait

Clock = Callable[[], float]
PURGE_EVERY = 600.0  # seconds between purges of finished messages past retention
SAFETY = 1 / 6  # of a lease: a job stops opening transactions this long before it ends
NODE_EVERY = 10.0  # seconds between a node's heartbeats in the store (`relay queue nodes`)
NODES_KEPT = 7 * 86400.0  # a node silent this long is forgotten
SWEEP_EVERY = 60.0  # seconds between sweeps for NDRs and delay warnings left pending
DEAD_BATCH = 200  # jobs of dead destinations a claim may hand out besides the live ones
INLINE_BODY = 256 * 1024  # bodies up to this size come with the claim (no separate read)


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


@dataclass
class _Running:
    job: Job
    lease: _Lease


class Scheduler:
    name = "delivery"

    def __init__(self, store: Store, deliverer: Deliverer, config: Config, *, hostname: str,
                 clock: Clock = time.time, owner: str | None = None,
                 own_endpoints: Callable[[], list[tuple[str, int]]] | None = None,
                 tlsrpt_record: Callable[[str, AttemptReport, float], None] | None = None,
                 sweep_every: float = SWEEP_EVERY, monotonic: Clock = time.monotonic) -> None:
        d = config.delivery
        self.store = store
        self.deliverer = deliverer
        self.config = config
        self.hostname = config.ndr.reporting_mta or hostname
        self.clock = clock
        self.monotonic = monotonic
        self.node = config.queue.node or socket.gethostname()
        self.owner = owner or node_owner(self.node)
        self.started_at = clock()
        self.notices = Notices(store, config, hostname=self.hostname, owner=self.owner,
                               clock=clock)
        self.sites = Sites(limit=d.max_connections_per_domain,
                           initial=d.initial_connections_per_domain,
                           dead_time=d.effective_dead_time,
                           remember=max(d.effective_dead_time, max(d.retry_schedule)))
        self._capacity = d.max_connections
        self._reserved = d.effective_reserved_connections
        self._active: dict[asyncio.Task[None], _Running] = {}
        self._retrying = 0  # of _active: jobs of deferred mail
        self._slot_freed = asyncio.Event()
        self._draining = False
        self._loop_task: asyncio.Task[None] | None = None
        self._node_task: asyncio.Task[None] | None = None
        self._renew_task: asyncio.Task[None] | None = None
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
        self._renew_task = asyncio.create_task(self._renewals(), name="lease-heartbeat")

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
            await asyncio.wait(list(self._active), timeout=max(0.0, deadline - loop.time()))

    async def stop(self) -> None:
        self._draining = True
        await cancel_and_wait([self._loop_task, self._sweep_task, self._node_task,
                               self._renew_task, *self._active])
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

    def _free(self) -> tuple[int, int]:
        """Slots free now: in total, and for deferred mail (the reserve is new mail's)."""
        free = self._capacity - len(self._active)
        retry_free = min(free, self._capacity - self._reserved - self._retrying)
        return max(0, free), max(0, retry_free)

    async def _round(self) -> float:
        """Claim what is due and may start; returns how long to sleep at most."""
        d = self.config.delivery
        now = self.clock()
        self._maybe_sweep(now)  # first: it runs even while claims fail
        free, retry_free = self._free()
        caps = self.sites.caps(now)
        dead_limit = DEAD_BATCH if DEAD in caps.values() else 0
        started = suspended = 0
        if free > 0 or dead_limit:
            jobs = await self.store.claim(
                now=now, owner=self.owner, lease_seconds=d.lease, limit=free,
                retry_limit=retry_free, caps=caps, initial=self.sites.initial,
                dead_limit=dead_limit, max_recipients=d.max_recipients_per_transaction,
                inline_body=INLINE_BODY)
            dead: list[tuple[Job, DeadSite]] = []
            back: list[Job] = []
            for job in jobs:
                site = self.sites.dead(job.domain, now)
                if site is not None:
                    dead.append((job, site))
                elif self._may_start(job, now):
                    self._dispatch(job, now)
                    started += 1
                else:  # a split group beyond a limit: claimed again at a later round
                    back.append(job)
            if back:
                with contextlib.suppress(StoreError):
                    await self.store.unlease(self.owner, [r for j in back
                                                          for r, _, _ in j.recipients],
                                             wake=False)
            if dead:
                suspended = len(dead)
                await self._suspend(dead, now)
        if now - self._last_purge >= PURGE_EVERY:
            self._last_purge = now
            if await self.store.singleton("purge", self.owner, now=now, ttl=3 * PURGE_EVERY):
                await self.store.purge(now=now, retention=self.config.queue.trace_retention)
                await self.store.forget_nodes(before=now - NODES_KEPT)
        if dead_limit and suspended >= dead_limit:
            return 0.0  # more work of dead destinations may be due: go on at once
        timeout = d.poll_interval
        if started < free:  # nothing more may start now: sleep until the next due time
            nxt = await self.store.next_due(self.clock())
            if nxt is not None and nxt > self.clock():
                timeout = min(timeout, max(0.01, nxt - self.clock()))
            # due now but not claimed: held back by a limit; a freed slot wakes the loop
        return timeout

    def _may_start(self, job: Job, now: float) -> bool:
        free, retry_free = self._free()
        return self.sites.free(job.domain, now) > 0 and free > 0 and \
            (job.fresh or retry_free > 0)

    async def _sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        waiters = [asyncio.ensure_future(self.store.new_work.wait()),
                   asyncio.ensure_future(self._slot_freed.wait())]
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
        self.store.new_work.clear()
        self._slot_freed.clear()

    def _dispatch(self, job: Job, now: float) -> None:
        if job.taken_from:
            event("takeover", level="warning", id=job.message_id, domain=job.domain,
                  recipients=len(job.recipients), previous=job.taken_from, owner=self.owner)
        self.sites.started(job.domain, now)
        running = _Running(job, _Lease(self.monotonic(), self.config.delivery.lease,
                                       self.monotonic))
        task = asyncio.create_task(self._guarded(running), name=f"deliver {job.message_id}")
        self._active[task] = running
        if not job.fresh:
            self._retrying += 1

        def done(t: asyncio.Task[None]) -> None:
            if self._active.pop(t, None) is not None and not job.fresh:
                self._retrying -= 1
            self._slot_freed.set()

        task.add_done_callback(done)

    async def _guarded(self, running: _Running) -> None:
        job, lease = running.job, running.lease
        report: AttemptReport | None = None
        try:
            report = await self.run_job(job, lease)
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
                    [job_result(self.config.delivery, job, {}, None, now,
                                        default=out)], now=now,
                    owner=self.owner)
        finally:
            result = feedback(report) if report is not None else Feedback.NEUTRAL
            outcome = next(iter(report.outcomes.values()), None) if report else None
            self._site_changed(self.sites.finished(job.domain, result, self.clock(),
                                                   outcome))

    def _site_changed(self, change: Change | None) -> None:
        if change is None:
            return
        if change.kind == "dead":
            assert change.dead is not None
            site = change.dead
            event("destination_dead", level="warning", domain=site.domain, code=site.code,
                  reply=site.reply, failures=site.failures,
                  until=utc(site.until).isoformat())
        else:
            event("destination_recovered", domain=change.domain)

    async def _renewals(self) -> None:
        """Renew the leases of the jobs running longer than a third of the lease, all in
        one write: an attempt may legitimately take longer than `delivery.lease` (slow
        servers, many MX hosts), and work whose lease ran out would be claimed and
        delivered a second time. A job whose rows come back short was taken over (this
        node stalled past its lease): it is lost. Short jobs cost no write at all."""
        seconds = self.config.delivery.lease
        while True:
            await asyncio.sleep(seconds / 6)
            due = [r for r in self._active.values()
                   if not r.lease.lost and self.monotonic() - r.lease.renewed_at >= seconds / 3]
            if not due:
                continue
            asked = self.monotonic()
            ids = [rid for r in due for rid, _, _ in r.job.recipients]
            try:
                renewed = await self.store.renew_leases(self.owner, ids, now=self.clock(),
                                                        lease=seconds)
            except StoreError:
                continue  # may_send() turns False if this lasts
            for r in due:
                if all(rid in renewed for rid, _, _ in r.job.recipients):
                    r.lease.renewed_at = asked
                elif not r.lease.lost:
                    r.lease.lost = True
                    self._lease_lost(r.job, "taken over by another worker")

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
        self._sweep_task = asyncio.create_task(self.notices.sweep(now, self.sweep_every),
                                               name="notice-sweep")

    # --- dead destinations ----------------------------------------------------------

    async def _suspend(self, jobs: list[tuple[Job, DeadSite]], now: float) -> None:
        """Defer the claimed work of dead destinations at once, without a connection:
        to its first plan point after the dead time (Postfix: "delivery temporarily
        suspended"). One write for all of them."""
        results = []
        for job, site in jobs:
            out = site.outcome()
            results.append(job_result(self.config.delivery, job, {}, None, now,
                                               default=out, after=site.until))
        try:
            await self.store.record(results, now=now, owner=self.owner)
        except StoreError as exc:  # their leases run out: claimed again later
            event("storage_error", level="error", kind="scheduler", detail=str(exc))
            return
        for (job, _), res in zip(jobs, results, strict=True):
            await self.notices.after_attempt(
                job.message_id, sender=job.sender,
                bounced=any(u.status is RecipientStatus.BOUNCED for u in res.updates),
                deferred=any(u.status is RecipientStatus.DEFERRED for u in res.updates))

    # --- one job --------------------------------------------------------------------

    async def run_job(self, job: Job, lease: _Lease | None = None) -> AttemptReport | None:
        """Deliver one job and record its outcome; the attempt's report (None when the
        job could not go on: its body failed its check or could not be read)."""
        started = self.clock()
        may_send = lease.may_send if lease is not None else None
        body = await self._load_body(job)
        if body is None:
            return None
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
        if sts_bounce_due(self.config.delivery, job, report, started) and \
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
        log_hosts(job, report)
        result = job_result(self.config.delivery, job, report.outcomes, report,
                                     started)
        await self.store.record([result], now=finished, owner=self.owner)
        # the outcome is recorded: what follows never records it a second time
        await self.notices.after_attempt(
            job.message_id, sender=job.sender,
            bounced=any(u.status is RecipientStatus.BOUNCED for u in result.updates),
            deferred=any(u.status is RecipientStatus.DEFERRED for u in result.updates))
        return report

    async def _load_body(self, job: Job) -> bytes | None:
        """The job's body, checked against its digest; None when the job cannot go on.
        Then its claim is never left to run out: a corrupt message is held (and its lease
        given back), any other failure gives the lease back at once."""
        try:
            return await self.store.job_body(job)
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
