"""TLS reporting (RFC 8460) at the I/O edge: record, close periods, discover, send.

`TlsReporter` is a `Component` of `relay serve` (relay.app, when `tlsrpt.enabled`):

- `record(domain, report, now)` is the scheduler's hook after each attempt: the pure
  relay.tlsrpt.report decides what the attempt adds, the store counts it in the open period
  (one upsert per host tried, committed with the job's own record). It never raises and
  never waits: reporting cannot slow or break delivery.
- Its loop closes each period when it ends and creates one report per policy domain,
  due at a random time up to `tlsrpt.max_delay` later. A due report is claimed (a lease:
  `relay tlsrpt send --now` may run beside), its domain's `_smtp._tls` TXT record is
  looked up (exactly one `v=TLSRPTv1` record), and the gzipped JSON goes to every
  destination: mailto: as a DKIM-signed multipart/report message through our own queue
  (null envelope sender, `extra["kind"] = "tlsrpt"`: delivered with DANE relaxed, and
  not counted), https: as a POST of `application/tlsrpt+gzip`, verified with PKIX.
  Failures are retried with a doubling wait for `tlsrpt.retry_lifetime` (RFC 8460 §5.5).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import random
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from relay.config import Config
from relay.dns.resolve import Resolver
from relay.errors import ConfigError, RelayError
from relay.log import event
from relay.model import Envelope, Rcode
from relay.store import Store
from relay.store.tlsrpt import ReportTask
from relay.sts import web
from relay.tasks import cancel_and_wait
from relay.tlsrpt import report as rpt
from relay.tlsrpt.mail import SIGNED_HEADERS, build_mail

if TYPE_CHECKING:
    from relay.delivery.trace import AttemptReport

Clock = Callable[[], float]
LEASE = 300.0  # seconds a claimed report is ours
MAX_SLEEP = 60.0
MAX_BACKOFF = 3600.0
PURGE_EVERY = 600.0
HTTP_OK = range(200, 300)


@dataclass(frozen=True)
class Settings:
    """What the reporter needs from the configuration, defaults resolved."""

    submitter: str
    organization: str
    contact: str
    from_address: str
    interval: float
    max_delay: float
    retry_interval: float
    retry_lifetime: float
    https_timeout: float
    https_ca_file: Path | None
    retention: float

    @classmethod
    def from_config(cls, cfg: Config, hostname: str) -> Settings:
        t = cfg.tlsrpt
        submitter = (t.submitter or cfg.listener.hostname or hostname).lower().rstrip(".")
        return cls(submitter=submitter, organization=t.organization_name or submitter,
                   contact=t.contact_info or f"postmaster@{submitter}",
                   from_address=t.from_address or f"tlsrpt-noreply@{submitter}",
                   interval=t.interval, max_delay=t.max_delay,
                   retry_interval=max(t.retry_interval, 0.1), retry_lifetime=t.retry_lifetime,
                   https_timeout=t.https_timeout, https_ca_file=t.https_ca_file,
                   retention=cfg.queue.trace_retention)


@dataclass(frozen=True)
class SendResult:
    """What happened to one report in one attempt (for the CLI and tests)."""

    policy_domain: str
    state: str  # "sent" | "pending" (retry later) | "failed" | "none" (no record)
    report_id: str = ""
    detail: str = ""
    sent: tuple[str, ...] = ()  # destinations that took it
    failed: tuple[tuple[str, str], ...] = ()  # (destination, why)
    successful: int = 0
    failures: int = 0

    def as_json(self) -> dict[str, Any]:
        return {"policy_domain": self.policy_domain, "state": self.state,
                "report_id": self.report_id or None, "detail": self.detail or None,
                "sent": list(self.sent),
                "failed": [{"destination": d, "detail": w} for d, w in self.failed],
                "successful_sessions": self.successful, "failed_sessions": self.failures}


# --- DKIM -----------------------------------------------------------------------------


class DkimSigner:
    """Signs report mail with dkimpy (RFC 6376; RFC 8460 §3: no l=, s=tlsrpt keys)."""

    def __init__(self, key_file: Path, selector: str, domain: str) -> None:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        try:
            key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(f"tlsrpt.dkim_key_file {key_file}: cannot load: {exc}",
                              key="tlsrpt.dkim_key_file") from None
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ConfigError(f"tlsrpt.dkim_key_file {key_file}: not an RSA key",
                              key="tlsrpt.dkim_key_file")
        self._pem = key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.TraditionalOpenSSL,
                                      serialization.NoEncryption())
        self.selector = selector
        self.domain = domain.lower().rstrip(".")

    def sign(self, message: bytes) -> bytes:
        import dkim

        header = dkim.sign(message, self.selector.encode(), self.domain.encode(), self._pem,
                           include_headers=[h.encode() for h in SIGNED_HEADERS],
                           canonicalize=(b"relaxed", b"relaxed"), tlsrpt=True)
        return bytes(header) + message


# --- HTTPS ----------------------------------------------------------------------------


async def _post(url: str, ip: str, body: bytes, *, seconds: float,
                context: ssl.SSLContext) -> int:
    """POST a report to `url` at `ip` (our resolver's address for its host), with the
    certificate checked against the URL's host (relay.sts.web, shared with the MTA-STS
    policy fetch). Raises relay.sts.web.HttpsError."""
    parts = urlsplit(url)
    assert parts.hostname is not None
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    resp = await web.request(parts.hostname, ip, path, context=context,
                             port=parts.port or 443, method="POST", body=body,
                             headers=(("Content-Type", rpt.MEDIA_TYPE_GZIP),),
                             connect_timeout=seconds, total_timeout=seconds,
                             max_body=65536)
    return resp.status


# --- the reporter -----------------------------------------------------------------------


class TlsReporter:
    name = "tlsrpt"

    def __init__(self, store: Store, resolver: Resolver, config: Config, *, hostname: str,
                 clock: Clock = time.time, rng: random.Random | None = None,
                 owner: str | None = None) -> None:
        self.store = store
        self.resolver = resolver
        self.config = config
        self.settings = Settings.from_config(config, hostname)
        self.clock = clock
        self.rng = rng or random.Random()
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:tlsrpt"
        t = config.tlsrpt
        self.dkim: DkimSigner | None = None
        if t.dkim_key_file is not None and t.dkim_selector is not None:
            self.dkim = DkimSigner(t.dkim_key_file, t.dkim_selector,
                                   t.dkim_domain or self.settings.submitter)
        self._context: ssl.SSLContext | None = None
        self._task: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Future[Any]] = set()
        self._buffer: list[rpt.SessionResult] = []  # recorded, not yet taken by a write
        self._buffer_at = 0.0
        self._flush_queued = False
        self._last_purge = 0.0
        self._stopping = False

    # --- the hot path ---------------------------------------------------------------

    def record(self, domain: str, report: AttemptReport, now: float) -> None:
        """Count what one delivery attempt says about TLS. Never raises, never waits."""
        try:
            results = rpt.session_results(domain, report.plan, report.hosts)
            if not results:
                return
            self._buffer += results
            self._buffer_at = max(self._buffer_at, now)
            if self._flush_queued:
                return  # the queued write (ahead of this job's record) takes these too
            fut = self.store.tlsrpt_submit(self._take, interval=self.settings.interval)
            self._flush_queued = True
        except Exception as exc:  # reporting must never affect delivery
            event("internal_error", level="error", component=self.name,
                  error=f"{type(exc).__name__}: {exc}")
            return
        self._pending.add(fut)
        fut.add_done_callback(self._recorded)

    def _take(self) -> tuple[list[rpt.SessionResult], float]:
        """Called by the store's write when it runs: everything buffered until then."""
        taken, at = self._buffer, self._buffer_at
        self._buffer, self._buffer_at, self._flush_queued = [], 0.0, False
        return taken, at

    def _recorded(self, fut: asyncio.Future[Any]) -> None:
        self._pending.discard(fut)
        if self._flush_queued and fut.done() and not self._pending:
            self._flush_queued = False  # the write failed before taking the buffer
        if not fut.cancelled() and fut.exception() is not None:
            event("internal_error", level="error", component=self.name,
                  error=f"recording TLS results: {fut.exception()}")

    # --- component ------------------------------------------------------------------

    async def start(self) -> None:
        self._context = self.https_context()
        self._task = asyncio.create_task(self._run(), name="tlsrpt")

    async def wait(self) -> None:
        assert self._task is not None
        await self._task
        if not self._stopping:
            raise RelayError("the TLS report sender stopped")
        await asyncio.Event().wait()

    async def drain(self, deadline: float) -> None:
        self._stopping = True
        if self._pending:  # results of attempts that just ended
            loop = asyncio.get_running_loop()
            await asyncio.wait(self._pending, timeout=max(0.0, deadline - loop.time()))

    async def stop(self) -> None:
        self._stopping = True
        await cancel_and_wait([self._task])

    async def _run(self) -> None:
        while not self._stopping:
            try:
                await self.tick(self.clock())
                nxt = await self.store.tlsrpt_next_wakeup()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # never let reporting take the relay down
                event("internal_error", level="error", component=self.name,
                      error=f"{type(exc).__name__}: {exc}")
                nxt = None
            # Another process (`relay tlsrpt send --now`) may change the reports: look
            # again at least every quarter period (at most every minute).
            longest = min(MAX_SLEEP, max(1.0, self.settings.interval / 4))
            wait = longest if nxt is None else nxt - self.clock()
            await asyncio.sleep(min(longest, max(0.05, wait)))

    def https_context(self) -> ssl.SSLContext:
        ca = self.settings.https_ca_file
        try:
            ctx = ssl.create_default_context(cafile=str(ca) if ca else None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"tlsrpt.https_ca_file {ca}: {exc}",
                              key="tlsrpt.https_ca_file") from None
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx

    # --- periods and reports --------------------------------------------------------

    async def tick(self, now: float, *, cut: bool = False) -> list[SendResult]:
        """Close ended periods (with `cut`: the open one too, due at once) and send what
        is due. Returns what happened to each report tried. On a queue shared by several
        nodes only the holder of the "tlsrpt" singleton does it (`cut`, the operator's
        `relay tlsrpt send --now`, always does)."""
        s = self.settings
        if not cut and not await self.store.singleton("tlsrpt", self.owner, now=now,
                                                      ttl=3 * MAX_SLEEP):
            return []
        await self.store.tlsrpt_close_periods(
            now=now, cut=cut, delay=lambda: self.rng.uniform(0.0, s.max_delay))
        tasks = await self.store.tlsrpt_claim(now=now, owner=self.owner, lease=LEASE)
        results = list(await asyncio.gather(*(self._send_guarded(t, now) for t in tasks)))
        if now - self._last_purge >= PURGE_EVERY:
            self._last_purge = now
            await self.store.tlsrpt_purge(before=now - s.retention)
        return results

    async def _send_guarded(self, task: ReportTask, now: float) -> SendResult:
        try:
            return await self.send_report(task, now)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            detail = f"{type(exc).__name__}: {exc}"
            event("internal_error", level="error", component=self.name, error=detail)
            await self._retry_or_give_up(task, now, "", detail, sent=False)
            return SendResult(task.policy_domain, "pending", detail=detail)

    def _backoff(self, attempts: int) -> float:
        return min(MAX_BACKOFF, self.settings.retry_interval * 2 ** max(0, attempts - 1))

    async def _retry_or_give_up(self, task: ReportTask, now: float, rid: str, detail: str,
                                *, sent: bool) -> str:
        attempts = task.attempts + 1
        nxt = now + self._backoff(attempts)
        if nxt > task.due_at + self.settings.retry_lifetime:
            state = "sent" if sent else "failed"
            await self.store.tlsrpt_update(task.id, state=state, attempts=attempts,
                                           next_attempt_at=now, rid=rid, detail=detail,
                                           now=now)
            return state
        await self.store.tlsrpt_update(task.id, state="pending", attempts=attempts,
                                       next_attempt_at=nxt, rid=rid, detail=detail, now=now)
        return "pending"

    async def discover(self, policy_domain: str) -> rpt.Discovery | None:
        """The domain's reporting policy; None when the lookup failed (try again later)."""
        answer = await self.resolver.query(rpt.record_name(policy_domain), "TXT")
        if answer.rcode in (Rcode.NXDOMAIN, Rcode.NODATA):
            return rpt.Discovery(None, "no TLSRPT record")
        if answer.rcode is not Rcode.OK:
            return None
        return rpt.discover([str(r) for r in answer.records])

    async def send_report(self, task: ReportTask, now: float) -> SendResult:
        domain = task.policy_domain
        results = await self.store.tlsrpt_results(task.period_id, domain)
        ok = sum(r.count for r in results if r.success)
        bad = sum(r.count for r in results if not r.success)
        found = await self.discover(domain)
        if found is None:
            detail = f"lookup of {rpt.record_name(domain)} TXT failed"
            state = await self._retry_or_give_up(task, now, "", detail, sent=False)
            if state == "failed":
                event("tlsrpt_failed", level="warning", policy_domain=domain, via="dns",
                      detail=detail)
            return SendResult(domain, state, detail=detail, successful=ok, failures=bad)
        if found.policy is None or not results:
            why = found.reason or "nothing recorded"
            await self.store.tlsrpt_update(task.id, state="none", attempts=task.attempts + 1,
                                           next_attempt_at=now, rid="", detail=why, now=now)
            # Most domains publish no record: not worth a line a day each at info level.
            event("tlsrpt_failed", level="debug", policy_domain=domain, via="dns", detail=why)
            return SendResult(domain, "none", detail=why, successful=ok, failures=bad)
        s = self.settings
        rid = rpt.report_id(domain, task.begin, task.end, s.submitter)
        report = rpt.build_report(policy_domain=domain, results=results, begin=task.begin,
                                  end=task.end, organization=s.organization,
                                  contact=s.contact, rid=rid)
        gz = rpt.compress(rpt.encode(report), mtime=task.end)
        done = await self.store.tlsrpt_sends(task.id)
        sent = [d for d, (st, _) in done.items() if st == "sent"]
        failed: list[tuple[str, str]] = []
        mail_to = [a for a in found.policy.mailto if done.get(f"mailto:{a}", ("",))[0] != "sent"]
        if mail_to:
            outcome = await self._mail(report, gz, domain, task, mail_to, now)
            for addr in mail_to:
                dest = f"mailto:{addr}"
                await self.store.tlsrpt_set_send(task.id, dest, outcome[0], outcome[1],
                                                 now=now)
                if outcome[0] == "sent":
                    sent.append(dest)
                else:
                    failed.append((dest, outcome[1]))
        for url in found.policy.https:
            if done.get(url, ("",))[0] == "sent":
                continue
            st, detail = await self._https(url, gz, domain, rid)
            await self.store.tlsrpt_set_send(task.id, url, st, detail, now=now)
            if st == "sent":
                sent.append(url)
            else:
                failed.append((url, detail))
        if failed:
            why = "; ".join(f"{d}: {w}" for d, w in failed)
            state = await self._retry_or_give_up(task, now, rid, why, sent=bool(sent))
        else:
            state = "sent"
            await self.store.tlsrpt_update(task.id, state="sent", attempts=task.attempts + 1,
                                           next_attempt_at=now, rid=rid, detail="", now=now)
        return SendResult(domain, state, rid, "", tuple(sent), tuple(failed), ok, bad)

    async def _mail(self, report: dict[str, Any], gz: bytes, domain: str, task: ReportTask,
                    to: list[str], now: float) -> tuple[str, str]:
        s = self.settings
        body = build_mail(report=report, report_gz=gz, policy_domain=domain,
                          submitter=s.submitter, from_address=s.from_address, to=to,
                          begin=task.begin, end=task.end,
                          now=datetime.fromtimestamp(now, UTC))
        if self.dkim is not None:
            body = self.dkim.sign(body)
        try:
            qid = await self.store.enqueue(Envelope(
                sender="", recipients=tuple(to), body=body,
                smtputf8=not all(a.isascii() for a in to),
                extra={"kind": rpt.KIND, "policy_domain": domain,
                       "report_id": str(report["report-id"])}), now=now)
        except RelayError as exc:
            event("tlsrpt_failed", level="warning", policy_domain=domain, via="mailto",
                  detail=str(exc))
            return "failed", str(exc)
        event("tlsrpt_sent", policy_domain=domain, via="mailto", queue_id=qid,
              to=",".join(to), report_id=report["report-id"])
        return "sent", qid

    async def _addresses(self, host: str) -> list[str]:
        try:
            ipaddress.ip_address(host)
            return [host]
        except ValueError:
            pass
        found: list[str] = []
        for rdtype in ("A", "AAAA"):
            answer = await self.resolver.query(host, rdtype)
            found += [str(r) for r in answer.records if answer.rcode is Rcode.OK]
        return found

    async def _https(self, url: str, gz: bytes, domain: str, rid: str) -> tuple[str, str]:
        if self._context is None:
            self._context = self.https_context()
        host = urlsplit(url).hostname or ""
        addrs = await self._addresses(host)
        detail = f"no address for {host}"
        for ip in addrs[:4]:
            try:
                status = await _post(url, ip, gz, seconds=self.settings.https_timeout,
                                     context=self._context)
            except web.HttpsError as exc:
                detail = f"{ip}: {exc.kind}: {exc}"
                continue
            if status in HTTP_OK:
                event("tlsrpt_sent", policy_domain=domain, via="https", url=url,
                      status=status, report_id=rid)
                return "sent", f"HTTP {status}"
            detail = f"{ip}: HTTP {status}"
        event("tlsrpt_failed", level="warning", policy_domain=domain, via="https", url=url,
              detail=detail)
        return "failed", detail
