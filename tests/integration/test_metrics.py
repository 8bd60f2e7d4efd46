"""The metrics endpoint over real HTTP, fed by the event log."""

from __future__ import annotations

import asyncio
from typing import Any

from relay import log
from relay.ops.metrics import Metrics, MetricsServer


async def _get(port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    data = await reader.read()
    writer.close()
    head, _, body = data.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


def _value(text: str, metric: str) -> float:
    for line in text.splitlines():
        if line.startswith(metric + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{metric} not in output")


async def test_counters_follow_log_events_and_gauges_read_the_queue(capsys: Any) -> None:
    metrics = Metrics()
    metrics.install()

    async def snapshot() -> dict[str, Any]:
        return {"queue": {"by_status": {"queued": 3, "deferred": 2}, "oldest_age": 42.0,
                          "held": 1},
                "resolver_validating": False}

    async def health() -> tuple[bool, dict[str, Any]]:
        return False, {"resolver": "not validating"}

    server = MetricsServer(metrics, "127.0.0.1", 0, snapshot, health)
    await server.start()
    try:
        log.event("received", id="A")
        log.event("received", id="B")
        log.event("deferred", id="A", code="4.7.323")
        log.event("bounced", id="B", code="5.7.323")
        log.event("attempt", id="A", security="failed", code="4.7.323", tls="TLSv1.3")
        log.event("attempt", id="A", security="dane-authenticated", tls="TLSv1.3")
        log.event("attempt", id="C", dns_failure="servfail", code="4.4.312")
        log.event("corrupt_body", level="error", id="D", detail="body digest mismatch")
        log.event("job_released", id="E", reason="no message with queue id E")
        log.event("attempt", id="D", domain="bad.example", security="failed", code="4.7.323",
                  tls="TLSv1.2 ECDHE-RSA-AES128-GCM-SHA256", tls_version="TLSv1.2")
        log.event("attempt", id="E", domain="bad.example", code="4.7.324",
                  dns_failure="dnssec")
        log.event("storage_error", kind="full", detail="database or disk is full")
        status, body = await _get(server.port, "/metrics")
        assert status == 200
        assert _value(body, "relay_received_total") == 2
        assert _value(body, 'relay_deferred_total{code="4.7.323"}') == 1
        assert _value(body, 'relay_bounced_total{code="5.7.323"}') == 1
        assert _value(body, 'relay_dane_outcomes_total{code="4.7.323",outcome="failed"}') == 2
        assert _value(body, 'relay_dane_outcomes_total{code="",outcome="dane-authenticated"}') == 1
        assert _value(body, 'relay_tls_sessions_total{version="TLSv1.3"}') == 2
        assert _value(body, 'relay_dns_failures_total{kind="servfail"}') == 1
        assert _value(body, 'relay_queue_recipients{status="queued"}') == 3
        assert _value(body, "relay_queue_oldest_age_seconds") == 42.0
        assert _value(body, "relay_corrupt_bodies_total") == 1
        assert _value(body, "relay_jobs_released_total") == 1
        assert _value(body, "relay_queue_held_messages") == 1
        # DANE/DNSSEC failures by destination (x.7.321-x.7.324 only), storage errors,
        # the resolver gauge; the TLS version without the cipher.
        assert _value(body, 'relay_dane_failures_total{code="4.7.323",domain="bad.example"}') == 1
        assert _value(body, 'relay_dane_failures_total{code="4.7.324",domain="bad.example"}') == 1
        assert "relay_dane_failures_total{code=\"4.4.312\"" not in body
        assert _value(body, 'relay_storage_errors_total{kind="full"}') == 1
        assert _value(body, "relay_resolver_validating") == 0
        assert _value(body, 'relay_tls_sessions_total{version="TLSv1.2"}') == 1
        status, body = await _get(server.port, "/healthz")
        assert status == 503 and '"resolver": "not validating"' in body
        status, _ = await _get(server.port, "/nope")
        assert status == 404
    finally:
        metrics.uninstall()
        await server.stop()
    capsys.readouterr()


async def test_mta_sts_counters(capsys: Any) -> None:
    metrics = Metrics()
    metrics.install()
    server = MetricsServer(metrics, "127.0.0.1", 0)
    await server.start()
    try:
        log.event("sts_fetched", domain="a.example", policy_id="1", mode="enforce")
        log.event("sts_fetch_failed", domain="b.example", result_type="sts-policy-invalid")
        log.event("attempt", id="A", security="failed", code="4.7.342")
        log.event("attempt", id="A", security="sts-authenticated", tls="TLSv1.3")
        _, body = await _get(server.port, "/metrics")
        assert _value(body, 'relay_sts_fetches_total{result="ok"}') == 1
        assert _value(body, 'relay_sts_fetches_total{result="sts-policy-invalid"}') == 1
        assert _value(body, 'relay_sts_failures_total{code="4.7.342"}') == 1
        assert _value(body, 'relay_dane_outcomes_total{code="",outcome="sts-authenticated"}') \
            == 1
    finally:
        metrics.uninstall()
        await server.stop()
    capsys.readouterr()
