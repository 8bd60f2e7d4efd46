"""Thin asyncio driver for one outbound SMTP session; the protocol logic is in .protocol.

A small asyncio.Protocol feeds the sans-I/O reply parser, so every byte the server sent
is accounted for: after STARTTLS's 220, anything already buffered is an injection and
the session is aborted before the handshake (RFC 3207 §4.2, RFC 7672 §2.2). Certificate
checks are not done here; the captured chain goes to relay.dane.

Ordinary 4xx/5xx replies to MAIL/RCPT/DATA are values (TransactionResult). Failures that
end the session (connect, timeouts, a drop, a refused greeting/EHLO, TLS) raise
SmtpClientError / TlsError with the phase and, when there was one, the reply.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any, Self

from relay.config import DeliveryConfig
from relay.errors import SmtpClientError, TlsError, TlsInjection
from relay.smtp import protocol as p
from relay.smtp.protocol import (
    Event,
    Extensions,
    LocalProtocolError,
    ProtocolViolation,
    Reply,
    SessionState,
    State,
    TlsInfo,
    TransactionResult,
)
from relay.smtp.stream import ReplyStream
from relay.smtp.tlscompat import peer_chain

BODY_CHUNK = 256 * 1024  # bytes written before waiting for the socket (data block timeout)


@dataclass(frozen=True)
class Timeouts:
    """Seconds per phase (RFC 5321 §4.5.3.2); `tls` covers the STARTTLS reply and handshake."""

    connect: float = 30.0
    greeting: float = 300.0
    ehlo: float = 300.0
    mail: float = 300.0
    rcpt: float = 300.0
    data_init: float = 120.0
    data_block: float = 180.0
    data_end: float = 600.0
    tls: float = 60.0
    quit: float = 10.0

    @classmethod
    def from_config(cls, cfg: DeliveryConfig) -> Timeouts:
        return cls(
            connect=cfg.connect_timeout,
            greeting=cfg.greeting_timeout,
            ehlo=cfg.mail_timeout,
            mail=cfg.mail_timeout,
            rcpt=cfg.rcpt_timeout,
            data_init=cfg.data_init_timeout,
            data_block=cfg.data_block_timeout,
            data_end=cfg.data_end_timeout,
            tls=cfg.tls_timeout,
            quit=min(10.0, cfg.mail_timeout),
        )

    @classmethod
    def uniform(cls, seconds: float) -> Timeouts:
        """Every phase the same (tests)."""
        return cls(**{f.name: seconds for f in fields(cls)})


_TLS_VERSIONS = {
    "1.0": ssl.TLSVersion.TLSv1,
    "1.1": ssl.TLSVersion.TLSv1_1,
    "1.2": ssl.TLSVersion.TLSv1_2,
    "1.3": ssl.TLSVersion.TLSv1_3,
}


@functools.cache
def client_context(min_version: str = "1.2") -> ssl.SSLContext:
    """A shared client context: no certificate or name checks (DANE decides), min version.

    "1.0"/"1.1" (opportunistic TLS to old servers) also lowers OpenSSL's security level,
    without which OpenSSL 3 cannot negotiate them at all.
    """
    if min_version not in _TLS_VERSIONS:
        raise ValueError(f"unknown TLS version {min_version!r} (use 1.0, 1.1, 1.2 or 1.3)")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = _TLS_VERSIONS[min_version]
    if min_version in ("1.0", "1.1"):
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    return ctx


class SmtpSession:
    """One SMTP connection to one destination address. Create with `connect()`."""

    def __init__(self, stream: ReplyStream, transport: asyncio.Transport, *, peer: tuple[str, int],
                 helo_name: str, timeouts: Timeouts, pipeline_data: bool = True) -> None:
        self._stream = stream
        self._transport = transport
        self._state = SessionState()
        self._closing: Reply | None = None  # a 421 seen: the server is going away
        self.peer = peer
        self.helo_name = helo_name
        self.timeouts = timeouts
        self.greeting: Reply | None = None
        self.extensions = Extensions()
        self.tls: TlsInfo | None = None
        self.transactions = 0
        # With PIPELINING, DATA ends the MAIL/RCPT batch (RFC 2920 §3.1): one round trip less.
        self.pipeline_data = pipeline_data

    # --- life cycle ----------------------------------------------------------------

    @classmethod
    async def connect(cls, ip: str, port: int, *, helo_name: str,
                      timeouts: Timeouts | None = None, local_ip: str | None = None,
                      pipeline_data: bool = True) -> Self:
        """Connect and read the greeting. A non-2xx greeting raises (phase "greeting")."""
        t = timeouts or Timeouts()
        loop = asyncio.get_running_loop()
        stream = ReplyStream()
        local = (local_ip, 0) if local_ip else None
        try:
            async with asyncio.timeout(t.connect):
                transport, _ = await loop.create_connection(
                    lambda: stream, host=ip, port=port, local_addr=local
                )
        except TimeoutError:
            raise SmtpClientError(f"connect to {ip} port {port}: timeout after {t.connect:g}s",
                                  phase="connect") from None
        except OSError as exc:
            raise SmtpClientError(f"connect to {ip} port {port}: {exc.strerror or exc}",
                                  phase="connect") from None
        assert isinstance(transport, asyncio.Transport)
        sess = cls(stream, transport, peer=(ip, port), helo_name=helo_name, timeouts=t,
                   pipeline_data=pipeline_data)
        greeting = await sess._read("greeting", t.greeting)
        sess.greeting = greeting
        if not greeting.ok:
            await sess.quit()
            raise sess._reply_error("greeting", greeting)
        sess._state.advance(Event.GREETING)
        return sess

    @property
    def state(self) -> State:
        return self._state.state

    @property
    def local_ip(self) -> str:
        """Our address on this connection ("" when unknown): TLS-RPT's sending-mta-ip."""
        sockname = self._transport.get_extra_info("sockname")
        return str(sockname[0]) if sockname else ""

    @property
    def closed(self) -> bool:
        return self._state.state is State.CLOSED or self._stream.lost

    @property
    def usable(self) -> bool:
        """Ready for another transaction: open, between transactions, nothing unsolicited."""
        return (not self.closed and self._closing is None and not self._stream.pending
                and self._state.state in (State.READY, State.MAIL, State.RCPT))

    async def quit(self) -> None:
        """Say goodbye politely; never raises; closes the connection."""
        if not self.closed:
            try:
                self._transport.write(p.QUIT)
                async with asyncio.timeout(self.timeouts.quit):
                    await self._stream.next_reply()
            except (OSError, ProtocolViolation, RuntimeError):
                pass
        self.close()

    def close(self) -> None:
        if not self._transport.is_closing():
            self._transport.close()
        self._state.advance(Event.CLOSE)

    def _abort(self) -> None:
        self._transport.abort()
        self._state.advance(Event.CLOSE)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if exc[0] is None:
            await self.quit()
        else:
            self._abort()

    # --- I/O helpers ---------------------------------------------------------------

    def _error(self, phase: str, message: str, cls: type[SmtpClientError] = SmtpClientError,
               reply: Reply | None = None) -> SmtpClientError:
        self._abort()
        return cls(message, phase=phase, code=reply.code if reply else None,
                   reply=str(reply) if reply else None)

    def _reply_error(self, phase: str, reply: Reply,
                     cls: type[SmtpClientError] = SmtpClientError) -> SmtpClientError:
        return cls(f"{phase} refused: {reply}", phase=phase, code=reply.code, reply=str(reply))

    async def _read(self, phase: str, seconds: float) -> Reply:
        try:
            async with asyncio.timeout(seconds):
                return await self._stream.next_reply()
        except TimeoutError:
            raise self._error(phase, f"timeout after {seconds:g}s waiting for the {phase} reply",
                              ) from None
        except ProtocolViolation as exc:
            raise self._error(phase, f"bad {phase} reply: {exc}") from None
        except OSError as exc:
            raise self._error(phase, f"connection lost in {phase}: {exc}") from None

    async def _read_tx(self, phase: str, seconds: float) -> Reply:
        """A reply inside a transaction; after a 421 the rest are that 421 (no more reads)."""
        if self._closing is not None:
            return self._closing
        reply = await self._read(phase, seconds)
        if reply.code == 421:
            self._closing = reply
        return reply

    async def _send(self, data: bytes, phase: str, seconds: float) -> None:
        if self.closed or self._transport.is_closing():
            raise self._error(phase, f"connection already closed before {phase}")
        self._transport.write(data)
        await self._drain(phase, seconds)

    async def _drain(self, phase: str, seconds: float) -> None:
        try:
            async with asyncio.timeout(seconds):
                await self._stream.drain()
        except TimeoutError:
            raise self._error(phase, f"timeout after {seconds:g}s sending {phase}") from None
        except OSError as exc:
            raise self._error(phase, f"connection lost in {phase}: {exc}") from None

    def _require(self, event: Event) -> None:
        if not self._state.can(event):
            raise LocalProtocolError(f"{event.value} not allowed in state {self.state.value}")

    # --- commands ------------------------------------------------------------------

    async def ehlo(self) -> Reply:
        """EHLO; HELO when EHLO is refused with 5xx. Returns the accepted reply."""
        self._require(Event.HELLO)
        t = self.timeouts
        await self._send(p.ehlo(self.helo_name), "ehlo", t.ehlo)
        reply = await self._read("ehlo", t.ehlo)
        if reply.ok:
            self.extensions = p.parse_ehlo(reply)
            self._stream.parser.enhanced_codes = self.extensions.enhanced_status_codes
            self._state.advance(Event.HELLO)
            return reply
        if reply.permanent:
            await self._send(p.helo(self.helo_name), "helo", t.ehlo)
            helo_reply = await self._read("helo", t.ehlo)
            if helo_reply.ok:
                self.extensions = Extensions(esmtp=False)
                self._stream.parser.enhanced_codes = False
                self._state.advance(Event.HELLO)
                return helo_reply
            reply, phase = helo_reply, "helo"
        else:
            phase = "ehlo"
        await self.quit()
        raise self._reply_error(phase, reply)

    async def starttls(self, server_hostname: str | None, *, min_version: str = "1.2",
                       context: ssl.SSLContext | None = None) -> TlsInfo:
        """STARTTLS and the handshake (SNI = server_hostname). EHLO again afterwards.

        Raises TlsError: phase "starttls" when not offered or refused (the session stays
        usable in cleartext unless the reply was 421); TlsInjection (phase "starttls")
        when bytes were buffered after the 220 (aborted); phase "tls" when the handshake
        fails (aborted).
        """
        self._require(Event.STARTTLS)
        t = self.timeouts
        if not self.extensions.starttls:
            raise TlsError("STARTTLS not offered", phase="starttls")
        await self._send(p.STARTTLS, "starttls", t.tls)
        reply = await self._read("starttls", t.tls)
        if reply.code != 220:
            if reply.code == 421:
                self.close()
            raise self._reply_error("starttls", reply, TlsError)
        if self._stream.pending:
            raise self._error("starttls", "bytes buffered after the 220 reply to STARTTLS, "
                              "before the TLS handshake (STARTTLS response injection); "
                              "aborted", TlsInjection, reply)
        self._state.advance(Event.STARTTLS)
        ctx = context or client_context(min_version)
        sni = server_hostname or None
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(t.tls):
                new = await loop.start_tls(self._transport, self._stream, ctx,
                                           server_hostname=sni, ssl_handshake_timeout=t.tls)
        except TimeoutError:
            raise self._error("tls", f"TLS handshake timeout after {t.tls:g}s",
                              TlsError) from None
        except (OSError, ssl.SSLError, ConnectionError) as exc:
            why = str(exc) or type(exc).__name__  # an EOF has no text of its own
            raise self._error("tls", f"TLS handshake failed: {why}", TlsError) from None
        if new is None:  # pragma: no cover - only for a transport that is already closing
            raise self._error("tls", "TLS handshake failed: connection closed", TlsError)
        assert isinstance(new, asyncio.Transport)
        self._transport = new
        self._stream.transport = new
        if self._stream.pending:
            raise self._error("tls", "data received before EHLO on the TLS session", TlsError)
        sslobj: Any = new.get_extra_info("ssl_object")
        cipher = sslobj.cipher() if sslobj is not None else None
        self.tls = TlsInfo(
            version=(sslobj.version() if sslobj is not None else None) or "",
            cipher=cipher[0] if cipher else "",
            bits=cipher[2] if cipher else None,
            chain=tuple(peer_chain(sslobj)) if sslobj is not None else (),
            server_hostname=sni,
        )
        self.extensions = Extensions()
        self._stream.parser.enhanced_codes = False
        self._state.advance(Event.TLS_DONE)
        return self.tls

    async def rset(self) -> Reply:
        self._require(Event.RESET)
        await self._send(p.RSET, "rset", self.timeouts.mail)
        return await self._rset_reply()

    async def _rset_reply(self) -> Reply:
        reply = await self._read("rset", self.timeouts.mail)
        if not reply.ok:
            await self.quit()
            raise self._reply_error("rset", reply)
        self._state.advance(Event.RESET)
        return reply

    async def send_mail(self, sender: str, recipients: Iterable[str], body: bytes, *,
                        smtputf8: bool = False, size: int | None = None,
                        body_8bit: bool | None = None,
                        requiretls: bool = False) -> TransactionResult:
        """One transaction: MAIL, RCPT per recipient, DATA, the body.

        With PIPELINING, MAIL and every RCPT (and DATA, unless pipeline_data is False) go
        in one write; without it, one command per round trip.

        `body`: the message with CRLF line ends, not dot-stuffed. `smtputf8`: the message
        needs SMTPUTF8 (non-ASCII addresses also make it so). `size`: declared with SIZE=
        (default len(body)). `body_8bit`: None = detect. `requiretls`: MAIL FROM carries
        REQUIRETLS (the caller checked the server offers it). A server SIZE smaller than `size`
        refuses the message with 5.3.4, a missing SMTPUTF8 with 5.6.7, before MAIL.
        """
        rcpts = list(dict.fromkeys(recipients))
        if not rcpts:
            raise LocalProtocolError("send_mail without recipients")
        if self.closed or self._stream.pending:
            raise self._error("mail", "the server closed the session or sent an unsolicited "
                              "reply before MAIL")
        if self.state not in (State.READY, State.MAIL, State.RCPT):
            raise LocalProtocolError(f"send_mail not allowed in state {self.state.value}")
        ext = self.extensions
        need_utf8 = smtputf8 or p.needs_smtputf8(sender, rcpts)
        size = len(body) if size is None else size
        eight = (not body.isascii()) if body_8bit is None else body_8bit
        refused = p.precheck(ext, size=size, smtputf8=need_utf8)
        if refused is not None:
            return TransactionResult(None, {}, None, refused=refused)
        mail_cmd = p.mail_from(sender, size=size if "SIZE" in ext else None,
                               body_8bit=eight and ext.eightbitmime, smtputf8=need_utf8,
                               requiretls=requiretls)
        rcpt_cmds = [p.rcpt_to(r, smtputf8=need_utf8) for r in rcpts]
        t = self.timeouts
        reset = self.state is not State.READY
        replies: dict[str, Reply] = {}
        go: Reply | None = None  # the reply to a pipelined DATA
        if ext.pipelining:
            batch = (p.RSET if reset else b"") + mail_cmd + b"".join(rcpt_cmds)
            await self._send(batch + (p.DATA if self.pipeline_data else b""), "mail", t.mail)
            if reset:
                await self._rset_reply()
            mail = await self._read_tx("mail", t.mail)
            if mail.ok:
                self._state.advance(Event.MAIL_OK)
            for rcpt in rcpts:
                replies[rcpt] = await self._read_tx("rcpt", t.rcpt)
                if mail.ok and replies[rcpt].ok:
                    self._state.advance(Event.RCPT_OK)
            if self.pipeline_data:
                go = await self._read_tx("data", t.data_init)
        else:
            if reset:
                await self.rset()
            await self._send(mail_cmd, "mail", t.mail)
            mail = await self._read_tx("mail", t.mail)
            if mail.ok:
                self._state.advance(Event.MAIL_OK)
            for rcpt, cmd in zip(rcpts, rcpt_cmds, strict=True):
                if mail.ok and self._closing is None:
                    await self._send(cmd, "rcpt", t.rcpt)
                    replies[rcpt] = await self._read_tx("rcpt", t.rcpt)
                    if replies[rcpt].ok:
                        self._state.advance(Event.RCPT_OK)
                else:
                    replies[rcpt] = self._closing or mail
        data = await self._data(body, mail, replies, go)
        if self._closing is not None:
            self.close()
        return TransactionResult(mail, replies, data, pipelined=ext.pipelining)

    async def _data(self, body: bytes, mail: Reply, replies: dict[str, Reply],
                    go: Reply | None) -> Reply | None:
        """DATA (unless already pipelined: `go` is its reply), the body, the final reply."""
        t = self.timeouts
        accepted = mail.ok and any(r.ok for r in replies.values())
        if go is None:
            if not accepted:
                return None
            if self._closing is not None:
                return self._closing
            await self._send(p.DATA, "data", t.data_init)
            go = await self._read_tx("data", t.data_init)
        if go.code != 354:
            return go if accepted else None
        if not accepted:  # 354 with no recipient (RFC 2920 §3.1): end the empty message
            await self._send(b".\r\n", "data", t.data_block)
            await self._read("data", t.data_end)
            return None
        self._state.advance(Event.DATA_GO)
        payload = memoryview(p.encode_body(body))
        for start in range(0, len(payload), BODY_CHUNK):
            if self._stream.lost:
                break
            self._transport.write(payload[start:start + BODY_CHUNK])
            await self._drain("data", t.data_block)
        final = await self._read("data", t.data_end)
        if final.code == 421:
            self._closing = final
        self._state.advance(Event.DATA_DONE)
        self.transactions += 1
        return final
