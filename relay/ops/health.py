"""The checks behind `relay health` (the container's HEALTHCHECK): the listener answers
220, the queue database opens and passes `quick_check`, the resolver validates."""

from __future__ import annotations

import asyncio
import sqlite3
from typing import Any

from relay.config import Config
from relay.dns.resolve import Resolver, check_validating


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


