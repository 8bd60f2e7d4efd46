"""The listening SMTP server as an app component (start / drain / stop, see
relay.app), and loading its TLS context and users file from the configuration.

Every connection gets one relay.intake.session.IntakeSession bound to the shared
relay.intake.core.Intake.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

from relay.config import ListenerConfig
from relay.errors import ConfigError, RelayError
from relay.intake.auth import UserDb
from relay.intake.budget import return_freed_memory
from relay.intake.core import Intake
from relay.intake.session import IntakeSession
from relay.log import event


def load_tls(lc: ListenerConfig) -> ssl.SSLContext | None:
    """The server context for STARTTLS, or None; ConfigError naming the key on failure."""
    if lc.tls_cert is None and lc.tls_key is None:
        return None
    if lc.tls_cert is None or lc.tls_key is None:
        raise ConfigError("listener.tls_cert and listener.tls_key must be set together",
                          key="listener.tls_cert")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(lc.tls_cert), str(lc.tls_key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"listener.tls_cert/tls_key: cannot load {lc.tls_cert} / {lc.tls_key}: {exc}",
            key="listener.tls_cert") from None
    return ctx


def load_users(lc: ListenerConfig, tls: ssl.SSLContext | None) -> UserDb | None:
    if lc.users_file is None:
        return None
    if tls is None:
        raise ConfigError("listener.users_file needs listener.tls_cert and tls_key: AUTH is "
                          "only offered after STARTTLS", key="listener.users_file")
    return UserDb(Path(lc.users_file))


class Listener:
    """The SMTP listener as an app component (relay.app.Component)."""

    name = "listener"

    def __init__(self, intake: Intake, host: str, port: int, *, reuse_port: bool = False,
                 announce: bool = True) -> None:
        self.intake = intake
        self.host = host
        self.port = port
        self.reuse_port = reuse_port  # an intake worker: one of several sockets on the port
        self.announce = announce  # log `listening` (an intake worker leaves it to the pool)
        self._server: asyncio.Server | None = None

    @property
    def bound(self) -> list[tuple[str, int]]:
        if self._server is None:
            return []
        return [s.getsockname()[:2] for s in self._server.sockets]

    async def start(self) -> None:
        return_freed_memory()  # message buffers go back to the system (relay.intake.budget)
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(
                lambda: IntakeSession(self.intake, loop), self.host, self.port, backlog=256,
                reuse_port=self.reuse_port or None)
        except OSError as exc:
            raise RelayError(f"cannot listen on {self.host}:{self.port}: {exc}") from None
        host, port = self.bound[0]
        self.port = port
        if self.announce:
            event("listening", service="smtp", host=host, port=port,
                  tls=self.intake.tls_context is not None, auth=self.intake.auth_enabled)

    async def wait(self) -> None:
        await asyncio.Event().wait()  # the server runs inside the loop; it never ends alone

    async def drain(self, deadline: float) -> None:
        """Refuse new sessions (421 4.3.2), let open transactions finish until `deadline`
        (or for listener.data_timeout when that is shorter)."""
        self.intake.begin_drain()
        # No transaction may legitimately take longer than the DATA phase allows.
        loop = asyncio.get_running_loop()
        deadline = min(deadline, loop.time() + self.intake.settings.data_timeout)
        remaining = deadline - loop.time()
        if remaining > 0:
            try:
                await asyncio.wait_for(self.intake.empty.wait(), remaining)
            except TimeoutError:
                pass

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for session in list(self.intake.sessions):
            session.close_now("shutdown")
        if self._server is not None:
            try:
                await asyncio.wait_for(self._server.wait_closed(), 5)
            except TimeoutError:
                pass
            self._server = None
