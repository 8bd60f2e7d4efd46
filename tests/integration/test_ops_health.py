"""`relay health` (the container's HEALTHCHECK) against a running `relay serve`, and the
resolver probe's logging (relay.ops.health, relay.ops.components).

The HEALTHCHECK runs every 30 s: with a metrics endpoint it must not open SMTP sessions,
which the relay logs (`connect`/`disconnect`), or the log fills with probes.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from relay import log
from relay.dns.resolve import ValidationProbe
from relay.ops import components
from tests.support.dnsprocs import free_port
from tests.support.relayproc import RelayProc, start_relay

ROOT = Path(__file__).resolve().parents[2]


def _health(relay: RelayProc) -> tuple[int, dict[str, Any]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env["RELAY_CONFIG"] = str(relay.config_path)  # no -c, as in the image's HEALTHCHECK
    r = subprocess.run([sys.executable, "-m", "relay", "health", "--json"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=60)
    return r.returncode, json.loads(r.stdout)


def test_health_asks_healthz_and_leaves_no_session_in_the_log(tmp_path: Path) -> None:
    metrics = f"127.0.0.1:{free_port('127.0.0.1')}"
    with start_relay(tmp_path, metrics={"listen": metrics}) as relay:
        relay.wait_event("listening", service="metrics")
        for _ in range(3):
            code, result = _health(relay)
            # The test config's resolver is a closed port: only that check fails.
            assert code == 1 and result["resolver"]["ok"] is False
            assert result["listener"] == {
                "ok": True, "detail": f"the relay on {metrics} is listening on "
                                      f"127.0.0.1:{relay.port}"}
            assert result["database"]["ok"] is True
        with relay.smtp() as client:  # a real session is still logged
            client.noop()
        relay.wait_event("disconnect")
        assert len(relay.events("connect")) == 1
        assert relay.stop() == 0
    code, result = _health(relay)  # stopped: nobody answers on the metrics port
    assert code == 1 and result["listener"]["ok"] is False
    assert f"no relay answering on {metrics} (/healthz)" in result["listener"]["detail"]


def test_health_fails_when_the_relay_listens_on_another_port(tmp_path: Path) -> None:
    metrics = f"127.0.0.1:{free_port('127.0.0.1')}"
    with start_relay(tmp_path, metrics={"listen": metrics}) as relay:
        relay.wait_event("listening", service="metrics")
        other = free_port("127.0.0.1")
        relay.write_config(listener={"port": other})  # what `relay health` will read
        code, result = _health(relay)
        assert code == 1 and result["listener"]["ok"] is False
        assert f"reports no SMTP listener on port {other}" in result["listener"]["detail"]


def test_without_metrics_health_reads_the_banner(tmp_path: Path) -> None:
    with start_relay(tmp_path, listener={"port": free_port("127.0.0.1")}) as relay:
        _, result = _health(relay)
        assert result["listener"]["ok"] is True
        assert "220 relay.test ESMTP" in result["listener"]["detail"]
        relay.wait_event("disconnect")  # that fallback is an SMTP session, logged


# --- the resolver probe's log ----------------------------------------------------------------


async def test_resolver_probe_retries_quickly_and_logs_changes_only(
        monkeypatch: pytest.MonkeyPatch) -> None:
    script = [ValidationProbe(False, "refused"), ValidationProbe(False, "refused"),
              ValidationProbe(False, "refused"), ValidationProbe(False, "SERVFAIL"),
              ValidationProbe(True, "validates")]
    calls: list[float] = []

    async def fake_check(resolver: object) -> ValidationProbe:
        calls.append(time.monotonic())
        return script[min(len(calls), len(script)) - 1]

    seen: list[tuple[str, dict[str, Any]]] = []
    monkeypatch.setattr(components, "check_validating", fake_check)
    monkeypatch.setattr(log, "observers", [lambda n, f: seen.append((n, f))])
    monkeypatch.setattr(log, "log", log.EventLog(io.StringIO()))
    probe = components.ResolverProbe(object(), every=60, retry=0.05)  # type: ignore[arg-type]
    await probe.start()
    try:
        await asyncio.wait_for(probe.validated.wait(), 5)
    finally:
        await probe.stop()
    assert len(calls) == 5  # four failures retried every 0.05 s, not every 60 s
    logged = [(f["validating"], f["detail"]) for n, f in seen if n == "resolver_check"]
    assert logged == [(False, "refused"), (False, "SERVFAIL"), (True, "validates")]
