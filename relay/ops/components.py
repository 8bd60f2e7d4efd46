"""Operational components of `relay serve` and the `relay health` command.

- `ResolverProbe`: at start-up (in the background, so intake never waits for DNS) and
  then every few minutes, prove that the configured resolver validates DNSSEC; say it
  loudly in the log when it does not (a non-validating resolver silently turns DANE off).
  While it fails (say, the compose file's resolver is still starting) it probes again
  every few seconds and logs the recovery at once; the error is repeated only when it
  changes or every few minutes.
- `MetricsComponent`: the Prometheus endpoint (`metrics.listen`) with `/healthz`, which
  `relay health` asks about the listener (relay.ops.health).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from relay.config import Config, split_hostport
from relay.dns.resolve import Resolver, ValidationProbe, check_validating
from relay.log import event
from relay.ops.metrics import Metrics, MetricsServer
from relay.store import Store
from relay.tasks import cancel_and_wait

PROBE_EVERY = 300.0  # seconds between resolver probes while running
RETRY_EVERY = 5.0  # seconds between probes while the resolver fails


class ResolverProbe:
    name = "resolver-probe"

    def __init__(self, resolver: Resolver, every: float = PROBE_EVERY,
                 retry: float = RETRY_EVERY) -> None:
        self.resolver = resolver
        self.every = every
        self.retry = min(retry, every)
        self.last: ValidationProbe | None = None
        self.validated = asyncio.Event()  # set once a probe has found it validating
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self.name)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        logged: tuple[str, float] | None = None  # the failure last logged, and when
        while True:
            probe = await check_validating(self.resolver)
            if probe.validating:
                event("resolver_check", validating=True, detail=probe.detail)
                logged = None
                self.validated.set()
            elif logged is None or logged[0] != probe.detail \
                    or loop.time() - logged[1] >= self.every:
                event("resolver_check", level="error", validating=False, detail=probe.detail,
                      consequence="deliveries wait (up to 60 s after start-up), then are "
                      "deferred with 4.4.312 while dns.require_validating_resolver is true; "
                      "otherwise DANE is OFF")
                logged = (probe.detail, loop.time())
            self.last = probe
            await asyncio.sleep(self.every if probe.validating else self.retry)

    async def wait(self) -> None:
        await asyncio.Event().wait()

    async def drain(self, deadline: float) -> None:
        return None

    async def stop(self) -> None:
        await cancel_and_wait([self._task])


GAUGES_TTL = 120.0  # seconds: another node exports the queue gauges after that


class MetricsComponent:
    name = "metrics"

    def __init__(self, cfg: Config, store: Store, listener: Any, resolver: Resolver, *,
                 owner: str = "metrics") -> None:
        assert cfg.metrics.listen
        host, port = split_hostport(cfg.metrics.listen, 9125)
        self.metrics = Metrics()
        self.store, self.listener, self.resolver = store, listener, resolver
        self.owner = owner
        self.server = MetricsServer(self.metrics, host, port, self._snapshot, self._health)

    async def _snapshot(self) -> dict[str, Any]:
        """This node's resolver state, and the queue gauges when this node holds the
        "gauges" singleton: on a queue shared by several nodes they are the cluster's,
        exported by one node."""
        probe = self.resolver.last_probe
        snap: dict[str, Any] = {
            "resolver_validating": None if probe is None else probe.validating}
        now = time.time()
        if await self.store.singleton("gauges", self.owner, now=now, ttl=GAUGES_TTL):
            stats = await self.store.stats(now=now)
            snap["queue"] = {"by_status": stats.by_status, "oldest_age": stats.oldest_age,
                             "held": stats.held}
        return snap

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
            "resolver": probe.detail if probe else "not probed yet",
            "listening": [_hostport(host, port) for host, port in self.listener.bound]}

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


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
