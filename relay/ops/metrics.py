"""Prometheus metrics and `/healthz`, fed by the event log.

Counters follow the log's fixed events (one place decides what happened; the metrics
only count it), so a metric cannot disagree with the log. Queue gauges are read from
the store at scrape time. The HTTP endpoint is a few lines of asyncio: GET /metrics and
GET /healthz on `metrics.listen`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from relay import log

QueueSnapshot = Callable[[], Awaitable[dict[str, Any]]]
HealthCheck = Callable[[], Awaitable[tuple[bool, dict[str, Any]]]]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.received = Counter("relay_received", "Messages accepted into the queue", registry=r)
        self.rejected = Counter("relay_rejected", "SMTP commands refused by the listener",
                                ["code"], registry=r)
        self.delivered = Counter("relay_delivered", "Recipients delivered", registry=r)
        self.deferred = Counter("relay_deferred", "Recipients deferred, by code", ["code"],
                                registry=r)
        self.bounced = Counter("relay_bounced", "Recipients bounced, by code", ["code"],
                               registry=r)
        self.expired = Counter("relay_expired", "Recipients expired, by code", ["code"],
                               registry=r)
        self.ndr = Counter("relay_ndr_sent", "Non-delivery reports queued", registry=r)
        self.dane = Counter(
            "relay_dane_outcomes",
            "Delivery sessions by security: dane-authenticated, tls, plain, or failed",
            ["outcome", "code"], registry=r,
        )
        self.tls = Counter("relay_tls_sessions", "TLS sessions by protocol version",
                           ["version"], registry=r)
        self.dns_failures = Counter("relay_dns_failures", "DNS failures by kind", ["kind"],
                                    registry=r)
        self.sts_fetches = Counter("relay_sts_fetches",
                                   "MTA-STS policy fetches: ok or the RFC 8460 failure type",
                                   ["result"], registry=r)
        self.sts_failures = Counter("relay_sts_failures",
                                    "Sessions refused by an MTA-STS enforce policy, by code",
                                    ["code"], registry=r)
        self.auth = Counter("relay_auth_attempts", "SMTP AUTH attempts checked, by result",
                            ["result"], registry=r)
        self.auth_lockouts = Counter("relay_auth_lockouts",
                                     "Client addresses locked out of AUTH", registry=r)
        self.auth_refused = Counter(
            "relay_auth_refused", "AUTH commands refused with 421 (address locked out, or "
            "too many failures in one session)", registry=r)
        self.connections = Gauge("relay_smtp_connections",
                                 "SMTP client connections open now", registry=r)
        self.corrupt = Counter("relay_corrupt_bodies",
                               "Messages held because their body failed its digest check",
                               registry=r)
        self.released = Counter("relay_jobs_released",
                                "Claimed jobs given back without an attempt", registry=r)
        self.dane_failures = Counter(
            "relay_dane_failures",
            "Delivery attempts that failed for DANE or DNSSEC (codes x.7.321-x.7.324), by "
            "recipient domain and code", ["domain", "code"], registry=r)
        self.storage_errors = Counter("relay_storage_errors",
                                      "Failed writes (or reads) of the queue store, by kind",
                                      ["kind"], registry=r)
        self.resolver_validating = Gauge(
            "relay_resolver_validating",
            "1 when the last probe found the resolver validating DNSSEC, else 0", registry=r)
        self.takeovers = Counter(
            "relay_takeovers", "Recipients claimed from an expired lease of another worker "
            "(it died or stalled mid-delivery: possible duplicates)", registry=r)
        self.leases_lost = Counter(
            "relay_leases_lost", "Jobs stopped because their lease was taken over or could "
            "not be renewed in time", registry=r)
        self.gauges_holder = Gauge(
            "relay_queue_gauges_exported", "1 when this node exports the queue gauges (on a "
            "queue shared by several nodes, one node does)", registry=r)
        q = self.queue_registry = CollectorRegistry()  # the queue's gauges: see render()
        self.queue = Gauge("relay_queue_recipients", "Recipients in the queue by status",
                           ["status"], registry=q)
        self.held = Gauge("relay_queue_held_messages",
                          "Messages held (by an operator, or corrupt) with work left",
                          registry=q)
        self.oldest = Gauge("relay_queue_oldest_age_seconds",
                            "Age of the oldest message with unfinished recipients",
                            registry=q)

    def observe(self, name: str, fields: dict[str, Any]) -> None:
        """A log observer: count what the event says happened."""
        code = str(fields.get("code") or "")
        if name == "received":
            self.received.inc()
        elif name == "rejected":
            reply = str(fields.get("reply", ""))
            self.rejected.labels(code=reply[:3]).inc()
            if fields.get("command") == "AUTH" and reply.startswith("421"):
                self.auth_refused.inc()
        elif name == "auth":
            self.auth.labels(result="success" if fields.get("success") else "failure").inc()
        elif name == "auth_lockout":
            self.auth_lockouts.inc()
        elif name == "connect":
            self.connections.inc()
        elif name == "disconnect":
            self.connections.dec()
        elif name == "delivered":
            self.delivered.inc()
        elif name == "deferred":
            self.deferred.labels(code=code).inc()
        elif name == "bounced":
            self.bounced.labels(code=code).inc()
        elif name == "expired":
            self.expired.labels(code=code).inc()
        elif name == "ndr_sent":
            self.ndr.inc()
        elif name == "corrupt_body":
            self.corrupt.inc()
        elif name == "job_released":
            self.released.inc()
        elif name == "takeover":
            self.takeovers.inc(int(fields.get("recipients") or 1))
        elif name == "lease_lost":
            self.leases_lost.inc()
        elif name == "attempt":
            self._attempt(fields, code)
        elif name == "sts_fetched":
            self.sts_fetches.labels(result="ok").inc()
        elif name == "sts_fetch_failed":
            self.sts_fetches.labels(result=str(fields.get("result_type") or "error")).inc()
        elif name == "storage_error":
            self.storage_errors.labels(kind=str(fields.get("kind") or "")).inc()

    def _attempt(self, fields: dict[str, Any], code: str) -> None:
        security = fields.get("security")
        if security:
            self.dane.labels(outcome=str(security), code=code if security == "failed" else "").inc()
        # `tls_version` ("TLSv1.3"); `tls` alone is the older form (it carries the cipher).
        version = fields.get("tls_version") or fields.get("tls")
        if version:
            self.tls.labels(version=str(version)).inc()
        if code.partition(".")[2] in ("7.341", "7.342", "7.343"):
            self.sts_failures.labels(code=code).inc()
        kind = fields.get("dns_failure")
        if kind:
            self.dns_failures.labels(kind=str(kind)).inc()
        if code[1:].startswith(".7.32"):
            self.dane_failures.labels(domain=str(fields.get("domain") or ""), code=code).inc()

    def install(self) -> None:
        if self.observe not in log.observers:
            log.observers.append(self.observe)

    def uninstall(self) -> None:
        if self.observe in log.observers:
            log.observers.remove(self.observe)

    async def render(self, snapshot: QueueSnapshot | None) -> bytes:
        """The counters and this node's gauges, and the queue gauges when `snapshot`
        gives them (on a shared queue only the node holding the "gauges" singleton does:
        exported once)."""
        snap = await snapshot() if snapshot is not None else {}
        validating = snap.get("resolver_validating")
        if validating is not None:
            self.resolver_validating.set(1 if validating else 0)
        queue = snap.get("queue")
        self.gauges_holder.set(1 if queue is not None else 0)
        out = generate_latest(self.registry)
        if queue is None:
            return out
        for status in ("queued", "deferred", "delivered", "bounced"):
            self.queue.labels(status=status).set(queue.get("by_status", {}).get(status, 0))
        self.oldest.set(queue.get("oldest_age") or 0)
        self.held.set(queue.get("held") or 0)
        return out + generate_latest(self.queue_registry)


class MetricsServer:
    """GET /metrics (Prometheus text format) and GET /healthz (JSON, 200 or 503)."""

    def __init__(self, metrics: Metrics, host: str, port: int,
                 snapshot: QueueSnapshot | None = None, health: HealthCheck | None = None):
        self.metrics, self.host, self.port = metrics, host, port
        self.snapshot, self.health = snapshot, health
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        sock = self._server.sockets[0]
        self.port = sock.getsockname()[1]

    async def stop(self) -> None:
        if self._server:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 10)
            while (await asyncio.wait_for(reader.readline(), 10)) not in (b"\r\n", b"\n", b""):
                pass
            parts = request.decode("latin-1").split()
            path = parts[1] if len(parts) >= 2 else ""
            if len(parts) < 2 or parts[0] != "GET":
                status, ctype, body = "405 Method Not Allowed", "text/plain", b"GET only\n"
            elif path == "/metrics":
                status, ctype = "200 OK", CONTENT_TYPE_LATEST
                body = await self.metrics.render(self.snapshot)
            elif path == "/healthz":
                ok, detail = await self.health() if self.health else (True, {})
                status = "200 OK" if ok else "503 Service Unavailable"
                ctype, body = "application/json", json.dumps({"ok": ok, **detail}).encode()
            else:
                status, ctype, body = "404 Not Found", "text/plain", b"not found\n"
            writer.write(
                f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode() + body
            )
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError):
            pass
        finally:
            writer.close()
