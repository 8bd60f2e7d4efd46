"""The intake's shared state and policy: what every session consults.

`Intake` holds the settings (limits, host name), who may relay (client networks or SMTP
AUTH), the connection registry (total and per-IP limits, draining), and the hand-off to
the queue: a message is answered `250 … queued as ID` only after `sink.enqueue`
returned, i.e. after its COMMIT. Sessions (relay.intake.session) call it through the
small `SessionView` protocol, so this module does not import them.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from relay.config import ListenerConfig
from relay.errors import RelayError, StorageFull, StoreError
from relay.intake.auth import UserDb
from relay.intake.budget import MemoryBudget
from relay.intake.received import protocol, received_header, sanitize_token
from relay.intake.throttle import AuthThrottle, Verdict
from relay.log import event
from relay.model import Envelope

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

REPLY_FULL = "452 4.3.1 Insufficient system storage, try again later"
REPLY_UNAVAILABLE = "451 4.3.0 Temporary storage failure, try again later"


@dataclass
class Transaction:
    """What MAIL FROM started: the envelope so far."""

    sender: str
    smtputf8: bool = False
    body_8bit: bool = False
    recipients: list[str] = field(default_factory=list)
    requiretls: bool = False  # RFC 8689: authenticated TLS on every onward hop
    size: int | None = None  # declared with MAIL FROM ... SIZE=


class SessionView(Protocol):
    """What Intake needs of a session (relay.intake.session.SessionView)."""

    sid: str
    client_ip: str
    auth_user: str | None
    trusted: bool  # from allowed_networks, or authenticated: may use the reserved slots
    session: Any  # aiosmtpd's Session: host_name, extended_smtp

    @property
    def authenticated(self) -> bool: ...

    def tls_info(self) -> tuple[str | None, str | None]: ...

    def shutdown_idle(self) -> None: ...

    def close_now(self, reason: str) -> None: ...

    def under_stress(self) -> None: ...


class MessageSink(Protocol):
    """Where accepted mail goes (relay.store.Store)."""

    def new_id(self, now: float) -> str: ...

    async def enqueue(self, envelope: Envelope, *, now: float, qid: str | None = None
                      ) -> str: ...


@dataclass(frozen=True)
class IntakeSettings:
    hostname: str
    allowed_networks: tuple[IpNetwork, ...] = ()
    max_message_size: int = 10_240_000
    max_recipients: int = 1000
    max_connections: int = 200
    max_connections_per_ip: int = 50
    command_timeout: float = 300.0
    data_timeout: float = 600.0
    max_line_length: int = 4096
    max_hops: int = 50
    postmaster: str | None = None  # where RCPT TO:<postmaster> goes (ndr.postmaster)
    reserved_connections: int = 40  # of max_connections, only for trusted sessions
    line_timeout: float = 30.0  # to finish a command line once its first byte came
    stress_timeout: float = 10.0  # command and line timeout of untrusted sessions under stress
    auth_failure_delay: float = 1.0  # see relay.intake.throttle
    auth_failure_limit: int = 10
    auth_failure_window: float = 600.0
    auth_lockout: float = 600.0
    data_memory_limit: int = 128 * 2**20  # octets of all messages in flight (budget)

    @classmethod
    def from_config(cls, lc: ListenerConfig, hostname: str, *,
                    postmaster: str | None = None) -> IntakeSettings:
        reserved = lc.reserved_connections
        return cls(postmaster=postmaster,
            reserved_connections=lc.max_connections // 5 if reserved is None else reserved,
            line_timeout=lc.line_timeout, stress_timeout=lc.stress_command_timeout,
            auth_failure_delay=lc.auth_failure_delay, auth_failure_limit=lc.auth_failure_limit,
            auth_failure_window=lc.auth_failure_window, auth_lockout=lc.auth_lockout,
            data_memory_limit=lc.effective_data_memory_limit,
            hostname=hostname, allowed_networks=tuple(lc.allowed_networks),
            max_message_size=lc.max_message_size, max_recipients=lc.max_recipients,
            max_connections=lc.max_connections,
            max_connections_per_ip=lc.max_connections_per_ip,
            command_timeout=lc.command_timeout, data_timeout=lc.data_timeout,
            max_line_length=lc.max_line_length, max_hops=lc.max_hops,
        )


class Intake:
    """Policy, limits and storage hand-off shared by every session of one listener."""

    def __init__(self, settings: IntakeSettings, sink: MessageSink, *,
                 tls_context: Any = None, users: UserDb | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.sink = sink
        self.tls_context = tls_context
        self.users = users
        self.clock = clock
        self.sessions: set[SessionView] = set()
        self._untrusted: set[SessionView] = set()
        self._per_ip: Counter[str] = Counter()
        self._stress_at = -1e9  # monotonic time stress was last applied
        self._limit_logged: dict[str, float] = {}
        s = settings
        self.auth_throttle = AuthThrottle(delay=s.auth_failure_delay,
                                          limit=s.auth_failure_limit,
                                          window=s.auth_failure_window, lockout=s.auth_lockout)
        self._auth_turns: dict[str, tuple[asyncio.Lock, int]] = {}
        self.budget = MemoryBudget(s.data_memory_limit)  # messages in flight
        self.draining = False
        self.empty = asyncio.Event()
        self.empty.set()

    # --- connections -------------------------------------------------------------------

    @property
    def untrusted_limit(self) -> int:
        """Connections open to untrusted clients at most: the rest is kept in reserve."""
        s = self.settings
        return max(0, s.max_connections - s.reserved_connections)

    @property
    def stressed(self) -> bool:
        """The untrusted clients' share is full (Postfix's "stress"): their timeouts
        shrink to `stress_timeout`."""
        return len(self._untrusted) >= self.untrusted_limit

    def admit(self, session: SessionView) -> str | None:
        """None when the session may proceed, else the 421 reply that ends it.

        `session.trusted` (its address is in allowed_networks) decides whether it may
        take one of the reserved slots; untrusted sessions share the others, and when
        their share is full the idle or dripping ones among them are cut sooner
        (`under_stress`), so that slowloris clients cannot keep every slot."""
        host, ip = self.settings.hostname, session.client_ip
        if self.draining:
            return f"421 4.3.2 {host} Service shutting down, try again later"
        if len(self.sessions) >= self.settings.max_connections:
            self._limit_reached("total", len(self.sessions))
            return f"421 4.7.0 {host} Error: too many connections, try again later"
        if self._per_ip[ip] >= self.settings.max_connections_per_ip:
            self._limit_reached("per_ip", self._per_ip[ip], client_ip=ip)
            return f"421 4.7.0 {host} Error: too many connections from {ip}"
        if not session.trusted and self.auth_locked(ip) is not None:
            # An address locked out of AUTH has nothing else to do here (it may not
            # relay): turned away before its TLS handshake costs anything.
            return (f"421 4.7.0 {host} Error: too many failed authentications from {ip}, "
                    "try again later")
        if not session.trusted and len(self._untrusted) >= self.untrusted_limit:
            self._limit_reached("untrusted", len(self._untrusted))
            self._apply_stress()
            return f"421 4.7.0 {host} Error: too many connections, try again later"
        self.sessions.add(session)
        if not session.trusted:
            self._untrusted.add(session)
        self._per_ip[ip] += 1
        self.empty.clear()
        return None

    def promote(self, session: SessionView) -> None:
        """The session authenticated: it is trusted from now on (no longer counted in
        the untrusted share, no stress timeouts)."""
        session.trusted = True
        self._untrusted.discard(session)

    def _apply_stress(self) -> None:
        now = time.monotonic()
        if now - self._stress_at < 1.0:  # at most once a second
            return
        self._stress_at = now
        for session in list(self._untrusted):
            session.under_stress()

    def _limit_reached(self, limit: str, count: int, **fields: Any) -> None:
        """Log `connection_limit` at most once a minute per kind of limit."""
        now = time.monotonic()
        if now - self._limit_logged.get(limit, -1e9) < 60.0:
            return
        self._limit_logged[limit] = now
        event("connection_limit", level="warning", limit=limit, connections=count,
              untrusted=len(self._untrusted), total=len(self.sessions), **fields)

    def release(self, session: SessionView) -> None:
        if session not in self.sessions:
            return
        self.sessions.discard(session)
        self._untrusted.discard(session)
        self._per_ip[session.client_ip] -= 1
        if self._per_ip[session.client_ip] <= 0:
            del self._per_ip[session.client_ip]
        if not self.sessions:
            self.empty.set()

    def begin_drain(self) -> None:
        """No new sessions or transactions; idle sessions are told 421 and closed."""
        self.draining = True
        for session in list(self.sessions):
            session.shutdown_idle()

    # --- policy ------------------------------------------------------------------------

    def relay_allowed(self, client_ip: str, authenticated: bool) -> bool:
        return authenticated or self.ip_allowed(client_ip)

    def ip_allowed(self, client_ip: str) -> bool:
        """The address is in listener.allowed_networks."""
        try:
            addr = ipaddress.ip_address(client_ip)
        except ValueError:
            return False
        return any(addr in net for net in self.settings.allowed_networks)

    @property
    def auth_enabled(self) -> bool:
        return self.users is not None and self.tls_context is not None

    async def authenticate(self, user: str, password: bytes) -> bool:
        if self.users is None:
            return False
        return await asyncio.to_thread(self.users.verify, user, password)

    def auth_locked(self, client_ip: str) -> float | None:
        """Seconds left of the address's AUTH lockout, or None."""
        return self.auth_throttle.locked(client_ip, time.monotonic())

    def auth_failed(self, session: SessionView, user: str) -> Verdict:
        """Count a failed AUTH against the session's address; log the lockout it starts."""
        verdict = self.auth_throttle.failed(session.client_ip, time.monotonic())
        if verdict.locked_for is not None:
            event("auth_lockout", level="warning", session=session.sid,
                  client_ip=session.client_ip, user=user[:64], failures=verdict.failures,
                  seconds=verdict.locked_for)
        return verdict

    @contextlib.asynccontextmanager
    async def auth_turn(self, client_ip: str) -> AsyncIterator[None]:
        """One AUTH check at a time per client address (its sessions queue here), so
        the failure delay paces the address, not each of its connections."""
        lock, users = self._auth_turns.get(client_ip) or (asyncio.Lock(), 0)
        self._auth_turns[client_ip] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._auth_turns[client_ip]
            if users <= 1:
                del self._auth_turns[client_ip]
            else:
                self._auth_turns[client_ip] = (lock, users - 1)

    # --- storage -----------------------------------------------------------------------

    async def accept(self, session: SessionView, txn: Transaction,
                     parts: list[bytes]) -> tuple[str, dict[str, Any]]:
        """Prepend Received:, enqueue, and return the reply for the final dot.

        `parts` (relay.intake.data) are joined once, behind the Received: header, and
        the list is emptied, so that the message is held once while it is committed."""
        assert session.session is not None
        now = self.clock()
        hops = count_received(_head(parts))
        if hops >= self.settings.max_hops:  # RFC 5321 §6.3, Postfix's hopcount_limit
            return (f"554 5.4.6 Too many hops ({hops} Received: headers): mail loop?",
                    {"sender": txn.sender, "hops": hops})
        tls_version, cipher = session.tls_info()
        proto = protocol(esmtp=session.session.extended_smtp, tls=tls_version is not None,
                         auth=session.authenticated, smtputf8=txn.smtputf8)
        qid = self.sink.new_id(now)  # known before COMMIT: Received: names it (Postfix)
        header = received_header(
            helo=session.session.host_name, client_ip=session.client_ip,
            hostname=self.settings.hostname, proto=proto, queue_id=qid,
            now=dt.datetime.fromtimestamp(now).astimezone(),
            recipients=tuple(txn.recipients), tls_version=tls_version, tls_cipher=cipher,
        )
        body = b"".join([header, *parts])
        parts.clear()
        envelope = Envelope(
            sender=txn.sender, recipients=tuple(txn.recipients), body=body,
            smtputf8=txn.smtputf8, body_8bit=txn.body_8bit or not body.isascii(),
            client_ip=session.client_ip,
            client_helo=sanitize_token(session.session.host_name, limit=255),
            auth_user=session.auth_user, requiretls=txn.requiretls,
        )
        fields: dict[str, Any] = {"sender": txn.sender, "recipients": len(txn.recipients)}
        try:
            qid = await self.sink.enqueue(envelope, now=now, qid=qid)
        except StorageFull:
            return REPLY_FULL, fields
        except StoreError:
            return REPLY_UNAVAILABLE, fields
        except (RelayError, OSError, ValueError) as exc:
            event("internal_error", level="error", session=session.sid,
                  client_ip=session.client_ip, error=f"{type(exc).__name__}: {exc}")
            return REPLY_UNAVAILABLE, fields
        event("received", id=qid, session=session.sid, client_ip=session.client_ip,
              sender=txn.sender, recipients=len(txn.recipients), size=len(envelope.body),
              protocol=proto, auth_user=session.auth_user,
              requiretls=True if txn.requiretls else None)
        return f"250 2.0.0 Ok: queued as {qid}", fields


def _head(parts: list[bytes], most: int = 2**20) -> bytes:
    """The start of the message up to its header section's end (or `most` octets)."""
    head = b""
    for part in parts:
        head += part
        if b"\r\n\r\n" in head or len(head) >= most:
            break
    return head


def count_received(body: bytes) -> int:
    """Received: header fields in the message's header section."""
    end = body.find(b"\r\n\r\n")
    head = body if end < 0 else body[:end + 2]
    return sum(1 for line in head.split(b"\r\n") if line[:9].lower() == b"received:")


