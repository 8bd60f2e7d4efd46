"""The checks behind `relay health` (the container's HEALTHCHECK): the listener is up, the
queue database answers (SQLite: opens and passes `quick_check`; PostgreSQL: the
server answers with a migrated queue), the resolver validates.

The listener check does not open an SMTP session when it can avoid it. A HEALTHCHECK runs
every 30 seconds, and every SMTP session is two lines in the log (`connect`,
`disconnect`): 5,760 lines a day that hide the real ones. With `metrics.listen` set (the
compose file sets it), the check asks the running relay's `/healthz` instead: the relay
answers from the event loop that serves SMTP, and reports the listening sockets, so an
answer proves the process is alive, not stuck, and listening on `listener.port`. It is
not logged. Without a metrics endpoint it falls back to reading the SMTP banner (and that
session is logged like any other).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from relay.config import Config, split_hostport
from relay.dns.resolve import Resolver, check_validating
from relay.store import store_health

TIMEOUT = 5.0  # seconds for each network check


def _local(host: str) -> str:
    """Where to connect for a server bound to `host` (the wildcard means this machine)."""
    return "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host


async def _smtp_banner(host: str, port: int) -> tuple[bool, str]:
    connect_host = _local(host)
    try:
        async with asyncio.timeout(TIMEOUT):
            reader, writer = await asyncio.open_connection(connect_host, port)
            line = await reader.readline()
            writer.write(b"QUIT\r\n")
            writer.close()
    except (OSError, TimeoutError) as exc:
        return False, f"no SMTP listener on {connect_host}:{port}: {exc}"
    ok = line.startswith(b"220")
    return ok, f"{connect_host}:{port} answered {line.decode(errors='replace').strip()!r}"


async def _healthz(host: str, port: int) -> dict[str, Any]:
    """GET /healthz from the running relay (HTTP/1.0, any status); its JSON body."""
    async with asyncio.timeout(TIMEOUT):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(b"GET /healthz HTTP/1.0\r\nHost: relay\r\n\r\n")
            await writer.drain()
            data = await reader.read()
        finally:
            writer.close()
    _, _, body = data.partition(b"\r\n\r\n")
    result = json.loads(body)
    if not isinstance(result, dict):
        raise ValueError("not a JSON object")
    return result


async def _listener_via_relay(cfg: Config) -> tuple[bool, str]:
    assert cfg.metrics.listen
    mhost, mport = split_hostport(cfg.metrics.listen, 9125)
    where = f"{_local(mhost)}:{mport}"
    try:
        result = await _healthz(_local(mhost), mport)
    except (OSError, TimeoutError, ValueError) as exc:
        return False, f"no relay answering on {where} (/healthz): {exc or type(exc).__name__}"
    listening = [str(a) for a in result.get("listening") or ()]
    port = cfg.listener.port  # 0: any port (the kernel chose one)
    if not result.get("listener") or not listening or (
            port and not any(a.endswith(f":{port}") for a in listening)):
        return False, (f"the relay on {where} reports no SMTP listener on port {port} "
                       f"(listening: {', '.join(listening) or 'nothing'})")
    return True, f"the relay on {where} is listening on {', '.join(listening)}"


async def _check_listener(cfg: Config) -> tuple[bool, str]:
    if cfg.metrics.listen:
        return await _listener_via_relay(cfg)
    return await _smtp_banner(cfg.listener.host, cfg.listener.port)


async def health(cfg: Config) -> dict[str, Any]:
    listener = await _check_listener(cfg)
    database = await store_health(cfg.queue)
    probe = await check_validating(Resolver.from_config(cfg.dns))
    checks = {"listener": listener, "database": database,
              "resolver": (probe.validating, probe.detail)}
    return {"ok": all(ok for ok, _ in checks.values()),
            **{k: {"ok": ok, "detail": d} for k, (ok, d) in checks.items()}}
