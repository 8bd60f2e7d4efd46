"""Destination SMTP servers for tests: real aiosmtpd servers on loopback, one thread each.

    dest = Destination("127.25.0.1", tls=(leaf, [intermediate]),
                       replies={"rcpt:bad@example.test": (550, "5.1.1 no such user")})
    with dest:                                  # or `async with dest:`, or start()/stop()
        ... deliver to dest.host_ip, dest.port ...
        msg = dest.wait_messages(1)[0]          # Received(mail_from, rcpt_tos, body, tls, ...)

Every connection is logged (`dest.connections`): the raw bytes the server read (after
STARTTLS: the decrypted bytes), each command, TLS version and the SNI the client sent.
Several destinations can share one port on different 127.x.y.z addresses
(`start_group`), as delivery uses one port for every MX.

`replies` (a dict, may be changed while running) overrides replies by key: "mail" or
"mail:<sender>", "rcpt:<address>", "data" (the reply after the final "."), "starttls"
(instead of 220); values are (code, text) or a whole reply line. A 4xx/5xx refuses (the
message is not recorded); after any 421 the server closes the connection.

Hostile and broken modes: `inject_after_starttls` (bytes appended to the 220 reply to
STARTTLS in the same write, then the handshake goes on), `drop_in_data` (read the first
body line after 354, then reset the connection; True, or a count of DATA commands to
drop), `greeting_delay` (math.inf: never greet), `greeting` (e.g. "554 5.7.1 go away"),
`ehlo=False` (EHLO refused with 502: HELO only), `tls_max_version="1.1"`. Slow servers:
`command_delay` (seconds before every reply after the greeting, e.g. 0.05 for a
latency-bound destination), `data_delay` (seconds holding the reply to the final dot: a
transaction kept open).
`requiretls=True` advertises REQUIRETLS (RFC 8689) inside TLS and takes the MAIL
parameter (recorded in `mail_options`).
Settings are read per connection/command, so a test may change them while running.
"""

from __future__ import annotations

import asyncio
import functools
import math
import socket
import ssl
import threading
import warnings
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from tests.support.certs import Issued, server_context

ReplySpec = tuple[int, str] | str


@dataclass
class ConnectionLog:
    peer: tuple[str, int]
    chunks: list[bytes] = field(default_factory=list)  # each read (decrypted after STARTTLS)
    commands: list[str] = field(default_factory=list)  # "MAIL FROM:<a> SIZE=5", ...
    tls_version: str | None = None
    tls_cipher: str | None = None
    sni: str | None = None
    closed: threading.Event = field(default_factory=threading.Event)

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)

    def verbs(self) -> list[str]:
        return [c.split(" ", 1)[0].upper() for c in self.commands]


@dataclass
class Received:
    """One accepted message. `mail_from` is "" for the null sender."""

    mail_from: str
    rcpt_tos: list[str]
    body: bytes  # as received with dot-stuffing undone, CRLF line ends, no final "."
    mail_options: list[str]
    tls: bool
    tls_version: str | None
    sni: str | None
    helo: str | None
    smtputf8: bool
    connection: ConnectionLog


def _reply(spec: ReplySpec) -> str:
    if isinstance(spec, str):
        return spec
    code, text = spec
    return f"{code} {text}"


def _tls_version(name: str) -> ssl.TLSVersion:
    return {"1.0": ssl.TLSVersion.TLSv1, "1.1": ssl.TLSVersion.TLSv1_1,
            "1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}[name]


class _Handler:
    def __init__(self, dest: Destination) -> None:
        self.dest = dest

    def _ok(self, enhanced: str, text: str = "OK") -> str:
        return f"250 {enhanced} {text}" if self.dest.enhanced_status_codes else f"250 {text}"

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname  # aiosmtpd trap: a hook must set it itself
        out = [r for r in responses[:-1] if not r.startswith("250-AUTH")]
        if self.dest.pipelining:
            out.append("250-PIPELINING")
        if self.dest.enhanced_status_codes:
            out.append("250-ENHANCEDSTATUSCODES")
        if self.dest.requiretls and session.ssl is not None:
            out.append("250-REQUIRETLS")
        out.append("250 HELP")
        return out

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        custom = self.dest.reply_for(f"mail:{address}") or self.dest.reply_for("mail")
        if custom and not custom.startswith("2"):
            return custom
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return custom or self._ok("2.1.0")

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        custom = self.dest.reply_for(f"rcpt:{address}")
        if custom and not custom.startswith("2"):
            return custom
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return custom or self._ok("2.1.5")

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        custom = self.dest.reply_for("data")
        if custom and not custom.startswith("2"):
            return custom
        assert isinstance(server, _DestSMTP)
        if self.dest.data_delay:  # a transaction held open before its final reply
            await asyncio.sleep(self.dest.data_delay)
        log = server.conn_log
        content = envelope.original_content or b""
        sender = envelope.mail_from or ""
        self.dest._record(Received(
            mail_from="" if sender == "<>" else sender,
            rcpt_tos=list(envelope.rcpt_tos),
            body=bytes(content),
            mail_options=list(envelope.mail_options),
            tls=session.ssl is not None,
            tls_version=log.tls_version,
            sni=log.sni,
            helo=session.host_name,
            smtputf8=bool(envelope.smtp_utf8),
            connection=log,
        ))
        return custom or self._ok("2.0.0", "OK queued")


class _DestSMTP(SMTP):
    def __init__(self, dest: Destination, **kwargs: Any) -> None:
        super().__init__(_Handler(dest), **kwargs)
        self.dest = dest
        self.conn_log = ConnectionLog(peer=("", 0))
        self._inject: bytes | None = None
        self._greeted = False
        self._smtp_methods = {
            name: self._recording(name, method) for name, method in self._smtp_methods.items()
        }

    def _recording(self, name: str, method: Callable[[Any], Awaitable[None]]
                   ) -> Callable[[Any], Awaitable[None]]:
        @functools.wraps(method)
        async def run(arg: Any) -> None:
            self.conn_log.commands.append(f"{name} {arg}" if arg else name)
            await method(arg)
        return run

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self._original_transport is None
        super().connection_made(transport)
        if first:
            self.conn_log.peer = transport.get_extra_info("peername")[:2]
            self.dest._connected(self)
            return
        sslobj = transport.get_extra_info("ssl_object")
        if sslobj is not None:
            self.conn_log.tls_version = sslobj.version()
            cipher = sslobj.cipher()
            self.conn_log.tls_cipher = cipher[0] if cipher else None
            self.conn_log.sni = self.dest._sni.get(sslobj)

    def data_received(self, data: bytes) -> None:
        self.conn_log.chunks.append(bytes(data))
        super().data_received(data)

    def connection_lost(self, error: Exception | None) -> None:
        try:
            super().connection_lost(error)
        finally:
            self.dest._disconnected(self)

    async def push(self, status: Any) -> None:
        if self.dest.command_delay and self._greeted:
            await asyncio.sleep(self.dest.command_delay)
        self._greeted = True
        if self._inject is not None:
            inject, self._inject = self._inject, None
            raw = status.encode() if isinstance(status, str) else status
            self._writer.write(raw + b"\r\n" + inject)  # one write: one segment
            await self._writer.drain()
            return
        await super().push(status)
        text = status if isinstance(status, str) else status.decode("ascii", "replace")
        if text.startswith("421") and self.transport is not None:
            self.transport.close()  # 421: the server closes the channel (RFC 5321 §3.8)

    async def _handle_client(self) -> None:
        try:
            delay = self.dest.greeting_delay
            if delay:
                if math.isinf(delay):
                    await asyncio.get_running_loop().create_future()  # never greets
                else:
                    await asyncio.sleep(delay)
            greeting = self.dest.greeting
            if greeting and not greeting.startswith("2"):
                await self._refusing(greeting)
                return
        except asyncio.CancelledError:  # the client went away (eof_received cancels us)
            if self.transport is not None:
                self.transport.close()
            raise
        await super()._handle_client()

    async def _refusing(self, greeting: str) -> None:
        """RFC 5321 §3.1: after a 554 greeting, wait for QUIT; refuse everything else."""
        await self.push(greeting)
        while self.transport is not None:
            line = await self._reader.readline()
            if not line:
                break
            self.conn_log.commands.append(line.decode("utf-8", "replace").strip())
            if line.strip().upper() == b"QUIT":
                await self.push("221 2.0.0 Bye")
                break
            await self.push("503 5.5.1 Bad sequence of commands")
        if self.transport is not None:
            self.transport.close()

    async def smtp_EHLO(self, hostname: str) -> None:
        if not self.dest.ehlo:
            await self.push("502 5.5.2 Error: command not recognized")
            return
        await super().smtp_EHLO(hostname)

    async def smtp_MAIL(self, arg: str) -> None:
        words = (arg or "").split(" ")
        asked = any(w.upper() == "REQUIRETLS" for w in words)
        if asked and self.dest.requiretls and self.session is not None \
                and self.session.ssl is not None:
            arg = " ".join(w for w in words if w.upper() != "REQUIRETLS")
        await super().smtp_MAIL(arg)
        if asked and self.envelope is not None and self.envelope.mail_from is not None:
            self.envelope.mail_options.append("REQUIRETLS")

    async def smtp_STARTTLS(self, arg: str) -> None:
        if not arg and self.tls_context:
            custom = self.dest.reply_for("starttls")
            if custom:
                await self.push(custom)
                return
            self._inject = self.dest.inject_after_starttls
        await super().smtp_STARTTLS(arg)

    async def smtp_DATA(self, arg: str) -> None:
        assert self.envelope is not None and self.session is not None
        if (not arg and self.envelope.rcpt_tos and self.session.host_name
                and self.dest._take_drop()):
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            await self._reader.readuntil(b"\r\n")  # the body is coming: now drop
            assert self.transport is not None
            self.transport.abort()
            return
        await super().smtp_DATA(arg)


class Destination:
    """A real SMTP server on (host_ip, port) in its own thread and event loop."""

    def __init__(
        self,
        host_ip: str = "127.0.0.1",
        port: int = 0,
        *,
        tls: tuple[Issued, Sequence[Issued]] | ssl.SSLContext | None = None,
        starttls: bool = True,
        require_tls: bool = False,
        replies: dict[str, ReplySpec] | None = None,
        inject_after_starttls: bytes | None = None,
        drop_in_data: bool | int = False,
        smtputf8: bool = True,
        size_limit: int | None = None,
        pipelining: bool = True,
        enhanced_status_codes: bool = True,
        ehlo: bool = True,
        greeting: str | None = None,
        greeting_delay: float = 0.0,
        tls_max_version: str | None = None,
        hostname: str = "mx.example.test",
        requiretls: bool = False,
        command_delay: float = 0.0,
        data_delay: float = 0.0,
    ) -> None:
        self.host_ip = host_ip
        self.port = port
        self.starttls = starttls
        self.require_tls = require_tls
        self.replies: dict[str, ReplySpec] = dict(replies or {})
        self.inject_after_starttls = inject_after_starttls
        self.drop_in_data = drop_in_data
        self.smtputf8 = smtputf8
        self.size_limit = size_limit
        self.pipelining = pipelining
        self.enhanced_status_codes = enhanced_status_codes
        self.ehlo = ehlo
        self.greeting = greeting
        self.greeting_delay = greeting_delay
        self.hostname = hostname
        self.requiretls = requiretls
        self.command_delay = command_delay
        self.data_delay = data_delay
        self.presented_chain: list[bytes] = []  # DER, leaf first (when built from Issued)
        self.messages: list[Received] = []
        self.connections: list[ConnectionLog] = []
        self._sni: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
        self._cond = threading.Condition()
        self._live: set[_DestSMTP] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self.tls_context = self._make_context(tls, tls_max_version)

    # --- configuration -------------------------------------------------------------

    def _make_context(self, tls: tuple[Issued, Sequence[Issued]] | ssl.SSLContext | None,
                      max_version: str | None) -> ssl.SSLContext | None:
        if tls is None:
            return None
        if isinstance(tls, ssl.SSLContext):
            ctx = tls
        else:
            leaf, chain = tls
            ctx = server_context(leaf, list(chain))
            self.presented_chain = [leaf.der, *(c.der for c in chain)]
        if max_version is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                ctx.minimum_version = ssl.TLSVersion.TLSv1
                ctx.maximum_version = _tls_version(max_version)
            if max_version in ("1.0", "1.1"):
                ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        ctx.sni_callback = self._on_sni
        return ctx

    def _on_sni(self, sslobj: Any, name: str | None, ctx: ssl.SSLContext) -> None:
        if name is not None:
            self._sni[sslobj] = name

    def reply_for(self, key: str) -> str | None:
        spec = self.replies.get(key) or self.replies.get(key.lower())
        return _reply(spec) if spec is not None else None

    def _take_drop(self) -> bool:
        with self._cond:
            if self.drop_in_data is True:
                return True
            if isinstance(self.drop_in_data, int) and self.drop_in_data > 0:
                self.drop_in_data -= 1
                return True
            return False

    # --- recording -----------------------------------------------------------------

    def _connected(self, proto: _DestSMTP) -> None:
        with self._cond:
            self._live.add(proto)
            self.connections.append(proto.conn_log)
            self._cond.notify_all()

    def _disconnected(self, proto: _DestSMTP) -> None:
        with self._cond:
            self._live.discard(proto)
            proto.conn_log.closed.set()
            self._cond.notify_all()

    def _record(self, msg: Received) -> None:
        with self._cond:
            self.messages.append(msg)
            self._cond.notify_all()

    def wait_messages(self, n: int = 1, timeout: float = 10.0) -> list[Received]:
        """Block until at least n messages arrived; returns them all."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.messages) >= n, timeout):
                raise AssertionError(f"{self}: {len(self.messages)} messages, expected {n}")
            return list(self.messages)

    async def messages_async(self, n: int = 1, wait: float = 10.0) -> list[Received]:
        return await asyncio.to_thread(self.wait_messages, n, wait)

    def wait_idle(self, timeout: float = 10.0) -> list[ConnectionLog]:
        """Block until every connection so far is closed; returns the connection logs."""
        with self._cond:
            if not self._cond.wait_for(lambda: not self._live, timeout):
                raise AssertionError(f"{self}: {len(self._live)} connections still open")
            return list(self.connections)

    async def idle_async(self, wait: float = 10.0) -> list[ConnectionLog]:
        return await asyncio.to_thread(self.wait_idle, wait)

    # --- life cycle ----------------------------------------------------------------

    def _factory(self) -> _DestSMTP:
        assert self._loop is not None
        return _DestSMTP(
            self,
            hostname=self.hostname,
            ident="ESMTP test destination",
            tls_context=self.tls_context if self.starttls else None,
            require_starttls=self.require_tls,
            enable_SMTPUTF8=self.smtputf8,
            data_size_limit=self.size_limit,
            timeout=60,
            loop=self._loop,
        )

    def start(self) -> Destination:
        if self._thread is not None:
            raise RuntimeError("already started")
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                self._server = loop.run_until_complete(
                    loop.create_server(self._factory, host=self.host_ip, port=self.port)
                )
            except BaseException as exc:  # report bind errors to start()
                failure.append(exc)
                ready.set()
                loop.close()
                return
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self._shutdown())
                loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, name=f"dest-{self.host_ip}", daemon=True)
        self._thread.start()
        ready.wait(10)
        if failure:
            self._thread.join()
            self._thread = self._loop = None
            raise failure[0]
        return self

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for proto in list(self._live):
            if proto.transport is not None:
                proto.transport.abort()
        current = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not current]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._server = None

    def stop(self) -> None:
        if self._thread is None or self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._thread = self._loop = None

    def __enter__(self) -> Destination:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> Destination:
        return self.start()

    async def __aexit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"Destination({self.host_ip}:{self.port})"


def shared_port(ips: Sequence[str], attempts: int = 50) -> int:
    """A port that is free on every one of `ips` right now."""
    for _ in range(attempts):
        socks: list[socket.socket] = []
        try:
            for ip in ips:
                family = socket.AF_INET6 if ":" in ip else socket.AF_INET
                s = socket.socket(family, socket.SOCK_STREAM)
                socks.append(s)
                s.bind((ip, socks[0].getsockname()[1] if len(socks) > 1 else 0))
            return socks[0].getsockname()[1]
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise OSError(f"no port free on all of {list(ips)}")


def start_group(dests: Sequence[Destination], attempts: int = 20) -> int:
    """Start destinations on different addresses sharing one port; returns the port."""
    for _ in range(attempts):
        port = shared_port([d.host_ip for d in dests])
        started: list[Destination] = []
        try:
            for d in dests:
                d.port = port
                started.append(d.start())
            return port
        except OSError:
            for d in started:
                d.stop()
    raise OSError("could not bind the destinations on one shared port")
