"""Operational components of `relay serve` and the `relay health` command.

- `ResolverProbe`: at start-up (in the background, so intake never waits for DNS) and
  then every few minutes, prove that the configured resolver validates DNSSEC; say it
  loudly in the log when it does not (a non-validating resolver silently turns DANE off).
- `MetricsComponent`: the Prometheus endpoint (`metrics.listen`) with `/healthz`.
- `cmd_health`: the container's HEALTHCHECK: the listener answers 220, the queue database
  opens and passes `quick_check`, the resolver validates. Exit 0 when all hold.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import time
from typing import Any

from relay import config as configmod
from relay.config import Config, split_hostport
from relay.log import event
from relay.metrics import Metrics, MetricsServer
from relay.resolve import Resolver, ValidationProbe, check_validating
from relay.store import Store
from relay.tasks import cancel_and_wait

PROBE_EVERY = 300.0  # seconds between resolver probes while running


class ResolverProbe:
    name = "resolver-probe"

    def __init__(self, resolver: Resolver, every: float = PROBE_EVERY) -> None:
        self.resolver = resolver
        self.every = every
        self.last: ValidationProbe | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self.name)

    async def _run(self) -> None:
        while True:
            probe = await check_validating(self.resolver)
            if probe.validating:
                event("resolver_check", validating=True, detail=probe.detail)
            else:
                event("resolver_check", level="error", validating=False, detail=probe.detail,
                      consequence="deliveries are deferred with 4.4.312 while "
                      "dns.require_validating_resolver is true; otherwise DANE is OFF")
            self.last = probe
            await asyncio.sleep(self.every)

    async def wait(self) -> None:
        await asyncio.Event().wait()

    async def drain(self, deadline: float) -> None:
        return None

    async def stop(self) -> None:
        await cancel_and_wait([self._task])


class MetricsComponent:
    name = "metrics"

    def __init__(self, cfg: Config, store: Store, listener: Any, resolver: Resolver) -> None:
        assert cfg.metrics.listen
        host, port = split_hostport(cfg.metrics.listen, 9125)
        self.metrics = Metrics()
        self.store, self.listener, self.resolver = store, listener, resolver
        self.server = MetricsServer(self.metrics, host, port, self._snapshot, self._health)

    async def _snapshot(self) -> dict[str, Any]:
        stats = await self.store.stats(now=time.time())
        return {"by_status": stats.by_status, "oldest_age": stats.oldest_age}

    async def _health(self) -> tuple[bool, dict[str, Any]]:
        probe = self.resolver.last_probe
        db_ok = True
        try:
            await self.store.stats(now=time.time())
        except Exception:
            db_ok = False
        resolver_ok = bool(probe and probe.validating)
        return db_ok and resolver_ok, {
            "listener": bool(self.listener.bound), "database": db_ok,
            "resolver": probe.detail if probe else "not probed yet"}

    async def start(self) -> None:
        self.metrics.install()
        await self.server.start()
        event("listening", host=self.server.host, port=self.server.port, service="metrics")

    async def wait(self) -> None:
        await asyncio.Event().wait()

    async def drain(self, deadline: float) -> None:
        return None

    async def stop(self) -> None:
        self.metrics.uninstall()
        await self.server.stop()


# --- relay health -------------------------------------------------------------------------


async def _check_listener(host: str, port: int) -> tuple[bool, str]:
    connect_host = "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host
    try:
        async with asyncio.timeout(5):
            reader, writer = await asyncio.open_connection(connect_host, port)
            line = await reader.readline()
            writer.write(b"QUIT\r\n")
            writer.close()
    except (OSError, TimeoutError) as exc:
        return False, f"no SMTP listener on {connect_host}:{port}: {exc}"
    ok = line.startswith(b"220")
    return ok, f"{connect_host}:{port} answered {line.decode(errors='replace').strip()!r}"


def _check_database(cfg: Config) -> tuple[bool, str]:
    path = cfg.queue.path
    if not path.exists():
        return False, f"{path}: no queue database"
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            row = conn.execute("PRAGMA quick_check").fetchone()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        return False, f"{path}: {exc}"
    return row[0] == "ok", f"{path}: quick_check {row[0]}"


async def health(cfg: Config) -> dict[str, Any]:
    listener = await _check_listener(cfg.listener.host, cfg.listener.port)
    database = _check_database(cfg)
    probe = await check_validating(Resolver.from_config(cfg.dns))
    checks = {"listener": listener, "database": database,
              "resolver": (probe.validating, probe.detail)}
    return {"ok": all(ok for ok, _ in checks.values()),
            **{k: {"ok": ok, "detail": d} for k, (ok, d) in checks.items()}}


def cmd_health(args: argparse.Namespace) -> int:
    cfg = configmod.load(getattr(args, "config", None))
    result = asyncio.run(health(cfg))
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2))
    else:
        for name in ("listener", "database", "resolver"):
            r = result[name]
            print(f"{name:9} {'ok  ' if r['ok'] else 'FAIL'} {r['detail']}")
    return 0 if result["ok"] else 1
