"""One SMTP server session: aiosmtpd's protocol with the parts the relay cannot trust replaced.

aiosmtpd (1.4.6) keeps the connection plumbing (StreamReaderProtocol, the STARTTLS
transport swap that also discards plaintext sent behind STARTTLS, AUTH challenges).
Replaced here, because its versions are unsafe or too lax for a relay:
- the command loop: lines must end in CRLF and carry no bare CR or NUL, invalid UTF-8
  is refused, every refusal is logged, errors are bounded, draining answers 421;
- HELO/EHLO (the keywords we offer), MAIL/RCPT (RFC 5321 grammar, routing forms,
  SMTPUTF8, relay authorization, limits), AUTH (never its async-authenticator trap);
- DATA: read as raw lines, so bare CR, bare LF and NUL (SMTP smuggling) are seen and
  refused with 550 5.5.2; the size is counted while receiving and nothing is buffered
  past the limit; the DATA phase has its own deadline (aiosmtpd does not reset its
  timer during DATA).
Policy and storage live in relay.intake.core.Intake; this class speaks the protocol.
"""

from __future__ import annotations

import asyncio
import ipaddress
import secrets
import time
from typing import Any

from aiosmtpd.smtp import SMTP

from relay.intake.address import NEED_SMTPUTF8, Path, Refusal, parse_path
from relay.intake.budget import Grant
from relay.intake.core import Intake, Transaction
from relay.intake.data import MEMORY, PIECE, read_message
from relay.intake.data import REPLIES as DATA_REPLIES
from relay.intake.timers import SessionTimers
from relay.intake.tlsauth import TlsAuthCommands
from relay.log import event

MAX_COMMAND = 1000  # octets of a command line (RFC 5321 §4.5.3.1.4 says 512; be lenient)
MAX_AUTH_COMMAND = 12288  # RFC 4954 §4
MAX_ERRORS = 50  # refused commands per session before 421
RECIPIENT_OVERSHOOT = 1000  # RCPTs past max_recipients not counted as errors (Postfix)
READ_SIZE = 65536  # octets asked of each recv() (asyncio's default: 256 KiB)

def client_address(peer: Any) -> str:
    """The client IP as text; IPv4-mapped IPv6 addresses as IPv4."""
    host = peer[0] if isinstance(peer, tuple | list) and peer else str(peer or "")
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return str(host)
    mapped = getattr(addr, "ipv4_mapped", None)
    return str(mapped or addr)


class IntakeSession(SessionTimers, TlsAuthCommands, SMTP):
    """The protocol object of one client connection (see the module docstring)."""

    _txn: Transaction | None = None
    _lost = False
    _announced = False  # the connect event was written

    def __init__(self, intake: Intake, loop: asyncio.AbstractEventLoop) -> None:
        # Not SMTP.__init__: it runs inspect.getmembers() over the handler and the
        # protocol on every connection (a third of the CPU of a short session) to find
        # hooks this class does not use. Set the attributes its remaining methods
        # (connection_made/lost, push, challenge_auth, timeouts) read; a unit test
        # checks this against aiosmtpd's own list.
        s = intake.settings
        self.line_length_limit = s.max_line_length
        asyncio.StreamReaderProtocol.__init__(
            self, asyncio.StreamReader(loop=loop, limit=s.max_line_length),
            client_connected_cb=self._cb_client_connected, loop=loop)
        self.__ident__ = "ESMTP dane-relay"
        self.loop = loop
        self.event_handler = intake
        self.data_size_limit = s.max_message_size
        self.enable_SMTPUTF8 = True
        self._decode_data = False
        self.hostname = s.hostname
        self.tls_context = intake.tls_context
        self.require_starttls = False
        self._timeout_duration = s.command_timeout
        self._timeout_handle = None
        self._tls_handshake_okay = True
        self._tls_protocol = None
        self._original_transport = None
        self.session = None
        self.envelope = None
        self.transport = None
        self._handler_coroutine = None
        self._auth_require_tls = True
        self._proxy_timeout = None
        self._authenticator = None
        self._auth_callback = None
        self._auth_required = False
        self._auth_methods = {}
        self._handle_hooks = {}
        self._ehlo_hook_ver = None
        self._smtp_methods = {}
        self._enforce_call_limit = False
        self.intake = intake
        self.sid = secrets.token_hex(5)
        self.client_ip = ""
        self.auth_user: str | None = None
        self.trusted = False  # allowed_networks or authenticated (Intake.admit, promote)
        self.messages = 0
        self.idle = False  # waiting for a command with no transaction open
        self.admitted = False
        self.in_data = False
        self._errors = 0
        self._overshoot = 0
        self._auth_failures = 0
        self._close_reason = "eof"
        self._started = time.monotonic()

    # --- connection life cycle ---------------------------------------------------------

    def connection_lost(self, error: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        self.intake.release(self)
        if self._announced:  # every connect has its disconnect, and only those
            event("disconnect", session=self.sid, client_ip=self.client_ip,
                  reason=self._close_reason, messages=self.messages,
                  seconds=round(time.monotonic() - self._started, 3))
        super().connection_lost(error)

    def _set_rset_state(self) -> None:
        super()._set_rset_state()
        self._txn = None

    def _timeout_cb(self) -> None:
        self._close_reason = "timeout"
        self._abort(f"421 4.4.2 {self.hostname} Error: timeout exceeded",
                    command="DATA" if self.in_data else "")

    def _abort(self, reply: str, *, command: str = "", reason: str | None = None) -> None:
        """Send a final 421 without waiting and close (timeouts, shutdown)."""
        if reason:
            self._close_reason = reason
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        event("rejected", session=self.sid, client_ip=self.client_ip, command=command,
              reply=reply)
        try:
            transport.write(reply.encode("ascii") + b"\r\n")
        except Exception:
            pass
        transport.close()

    def shutdown_idle(self) -> None:
        """Draining: close this session now if it waits for a command outside a transaction."""
        if self.idle and self._txn is None:
            self._abort(f"421 4.3.2 {self.hostname} Service shutting down, try again later",
                        reason="shutdown")

    def close_now(self, reason: str) -> None:
        self._close_reason = reason
        if self.transport is not None:
            self.transport.close()

    @property
    def tls_active(self) -> bool:
        return self._tls_protocol is not None and self.session is not None \
            and self.session.ssl is not None

    @property
    def authenticated(self) -> bool:
        return bool(self.session and self.session.authenticated)

    def tls_info(self) -> tuple[str | None, str | None]:
        if not self.tls_active or self.transport is None:
            return None, None
        obj = self.transport.get_extra_info("ssl_object")
        if obj is None:
            return None, None
        cipher = obj.cipher()
        return obj.version(), cipher[0] if cipher else None

    # --- replies -----------------------------------------------------------------------

    async def reply(self, text: str, *, command: str = "", count: bool = True,
                    **fields: Any) -> None:
        """Send one reply; a 4xx/5xx is logged as `rejected` and (with `count`) counted
        towards the errors that end the session."""
        if text[:1] in ("4", "5"):
            event("rejected", session=self.sid, client_ip=self.client_ip, command=command,
                  reply=text, **fields)
            self._errors += 1 if count else 0
        await self.push(text)
        if self._errors >= MAX_ERRORS and self.transport is not None:
            self._abort(f"421 4.7.0 {self.hostname} Error: too many errors", reason="errors")

    # --- the command loop --------------------------------------------------------------

    async def _handle_client(self) -> None:
        assert self.session is not None
        self.client_ip = client_address(self.session.peer)
        if isinstance(getattr(self.transport, "max_size", None), int):
            # asyncio reads up to 256 KiB per recv() into a fresh buffer; 64 KiB (the DATA
            # piece size) keeps each read's buffer small (relay.intake.budget)
            self.transport.max_size = READ_SIZE  # type: ignore[union-attr]
        port = self.session.peer[1] if isinstance(self.session.peer, tuple) else None
        event("connect", session=self.sid, client_ip=self.client_ip, client_port=port)
        self._announced = True
        self.trusted = self.intake.ip_allowed(self.client_ip)
        refusal = self.intake.admit(self)
        if refusal is not None:
            self._abort(refusal, command="CONNECT", reason="limit")
            return
        self.admitted = True
        try:
            await self.push(f"220 {self.hostname} ESMTP dane-relay")
            while self.transport is not None and not self.transport.is_closing():
                self.begin_command_wait()  # relay.intake.timers
                self.idle = self._txn is None
                if self.idle and self.intake.draining:
                    self.shutdown_idle()
                    return
                try:
                    line = await self._read_command()
                finally:
                    self.idle = False
                    self.end_command_wait()
                if line is None:
                    return
                await self._command(line)
        except asyncio.CancelledError:
            self._writer.close()
            raise
        except (ConnectionError, asyncio.IncompleteReadError):
            self.close_now("eof")
        except Exception as exc:  # a bug must cost one session, never the relay
            event("internal_error", level="error", session=self.sid,
                  client_ip=self.client_ip, error=f"{type(exc).__name__}: {exc}")
            self._abort("421 4.3.0 Internal error, closing connection", reason="error")

    async def _read_command(self) -> bytes | None:
        """One command line with its line end; b"" when it was too long (discarded)."""
        try:
            return await self._reader.readuntil(b"\n")
        except asyncio.IncompleteReadError:
            return None
        except asyncio.LimitOverrunError as exc:
            await self._reader.readexactly(exc.consumed)
            while True:
                try:
                    await self._reader.readuntil(b"\n")
                    return b""
                except asyncio.LimitOverrunError as more:
                    await self._reader.readexactly(more.consumed)

    async def _command(self, raw: bytes) -> None:
        if not raw:
            await self.reply("500 5.5.2 Error: line too long", command="?")
            return
        if not raw.endswith(b"\r\n"):
            await self.reply("500 5.5.2 Error: command line must end with CRLF", command="?")
            return
        line = raw[:-2]
        if b"\r" in line or b"\x00" in line:
            await self.reply("500 5.5.2 Error: bare CR or NUL in command", command="?")
            return
        verb_bytes, _, arg_bytes = line.partition(b" ")
        verb = verb_bytes.decode("ascii", "replace").upper()
        if not verb.isascii() or not verb.isalpha() or len(verb) > 12:
            await self.reply("500 5.5.2 Error: command not recognized", command="?")
            return
        limit = MAX_AUTH_COMMAND if verb == "AUTH" else MAX_COMMAND
        if len(raw) > limit:
            await self.reply("500 5.5.2 Error: line too long", command=verb)
            return
        try:
            arg = arg_bytes.decode("utf-8").strip(" ")
        except UnicodeDecodeError:
            await self.reply("500 5.5.2 Error: invalid UTF-8 in command", command=verb)
            return
        if self.intake.draining and self._txn is None and verb != "QUIT":
            self._abort(f"421 4.3.2 {self.hostname} Service shutting down, try again later",
                        command=verb, reason="shutdown")
            return
        if (not self._tls_handshake_okay) and verb != "QUIT":
            await self.reply("554 5.7.0 Command refused due to lack of security", command=verb)
            return
        method = getattr(self, f"cmd_{verb}", None)
        if method is None:
            if verb in ("VRFY", "EXPN", "ETRN", "TURN", "BDAT"):
                await self.reply(f"502 5.5.1 Error: {verb} not implemented", command=verb)
            else:
                await self.reply("500 5.5.2 Error: command not recognized", command=verb)
            return
        await method(arg)

    # --- simple commands ---------------------------------------------------------------

    async def cmd_NOOP(self, arg: str) -> None:
        await self.push("250 2.0.0 Ok")

    async def cmd_RSET(self, arg: str) -> None:
        if arg:
            await self.reply("501 5.5.4 Syntax: RSET", command="RSET")
            return
        self._txn = None
        await self.push("250 2.0.0 Ok")

    async def cmd_QUIT(self, arg: str) -> None:
        self._close_reason = "quit"
        await self.push("221 2.0.0 Bye")
        if self.transport is not None:
            self.transport.close()

    async def cmd_HELP(self, arg: str) -> None:
        await self.push("214 2.0.0 See RFC 5321; this is an SMTP relay")

    async def cmd_HELO(self, arg: str) -> None:
        await self._greet(arg, esmtp=False)

    async def cmd_EHLO(self, arg: str) -> None:
        await self._greet(arg, esmtp=True)

    async def _greet(self, arg: str, *, esmtp: bool) -> None:
        verb = "EHLO" if esmtp else "HELO"
        if not arg:
            await self.reply(f"501 5.5.4 Syntax: {verb} hostname", command=verb)
            return
        assert self.session is not None
        self._txn = None
        self.session.host_name = arg
        self.session.extended_smtp = esmtp
        if not esmtp:
            await self.push(f"250 {self.hostname}")
            return
        lines = [self.hostname, "PIPELINING", f"SIZE {self.intake.settings.max_message_size}",
                 "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES"]
        if self.tls_context is not None and self._tls_protocol is None:
            lines.append("STARTTLS")
        if self.intake.auth_enabled and self.tls_active:
            lines.append("AUTH PLAIN LOGIN")
        if self.tls_active:  # RFC 8689 §4.1: only inside TLS
            lines.append("REQUIRETLS")
        # One write for the whole multi-line reply (not one send() per line).
        await self.push("\r\n".join(f"250{'-' if i < len(lines) - 1 else ' '}{text}"
                                      for i, text in enumerate(lines)))

    # --- the mail transaction ----------------------------------------------------------

    async def _path(self, verb: str, arg: str, keyword: str, role: str) -> Path | None:
        assert self.session is not None
        if not self.session.host_name:
            await self.reply("503 5.5.1 Error: send HELO/EHLO first", command=verb)
            return None
        if arg[: len(keyword)].upper() != keyword:
            await self.reply(f"501 5.5.4 Syntax: {verb} {keyword}<address>", command=verb)
            return None
        parsed = parse_path(arg[len(keyword):], role=role)
        if isinstance(parsed, Refusal):
            await self.reply(parsed.reply, command=verb)
            return None
        if parsed.params and not self.session.extended_smtp:
            await self.reply("501 5.5.4 Error: parameters need EHLO", command=verb)
            return None
        return parsed

    async def cmd_MAIL(self, arg: str) -> None:
        if self._txn is not None:
            await self.reply("503 5.5.1 Error: nested MAIL command", command="MAIL")
            return
        path = await self._path("MAIL", arg, "FROM:", "sender")
        if path is None:
            return
        params = dict(path.params)
        body = (params.pop("BODY", None) or "7BIT").upper()
        if body not in ("7BIT", "8BITMIME"):
            await self.reply("501 5.5.4 Error: BODY must be 7BIT or 8BITMIME", command="MAIL")
            return
        smtputf8 = "SMTPUTF8" in params
        if params.pop("SMTPUTF8", None) is not None:
            await self.reply("501 5.5.4 Error: SMTPUTF8 takes no value", command="MAIL")
            return
        size = params.pop("SIZE", None)
        if size is not None:
            if not size.isdigit() or len(size) > 20:
                await self.reply("501 5.5.4 Error: bad SIZE value", command="MAIL")
                return
            if int(size) > self.intake.settings.max_message_size:
                await self.reply("552 5.3.4 Message size exceeds fixed maximum message size",
                                 command="MAIL", sender=path.address)
                return
        params.pop("AUTH", None)  # RFC 4954 §5: may be ignored
        requiretls = "REQUIRETLS" in params
        if params.pop("REQUIRETLS", None) is not None:
            await self.reply("501 5.5.4 Error: REQUIRETLS takes no value", command="MAIL")
            return
        if requiretls and not self.tls_active:
            await self.reply("530 5.7.10 REQUIRETLS needs a TLS session: STARTTLS first",
                             command="MAIL")
            return
        if params:
            await self.reply(f"555 5.5.4 Error: unsupported parameter {sorted(params)[0]}",
                             command="MAIL")
            return
        if path.mailbox is not None and not path.mailbox.ascii and not smtputf8:
            await self.reply(NEED_SMTPUTF8.reply, command="MAIL")
            return
        self._txn = Transaction(path.address, smtputf8=smtputf8, body_8bit=body == "8BITMIME",
                                requiretls=requiretls,
                                size=int(size) if size is not None else None)
        await self.push("250 2.1.0 Ok")

    async def cmd_RCPT(self, arg: str) -> None:
        if self._txn is None:
            await self.reply("503 5.5.1 Error: need MAIL command", command="RCPT")
            return
        path = await self._path("RCPT", arg, "TO:", "recipient")
        if path is None:
            return
        if path.params:
            await self.reply(f"555 5.5.4 Error: unsupported parameter {next(iter(path.params))}",
                             command="RCPT")
            return
        if path.postmaster:
            await self._rcpt_postmaster()
            return
        mailbox = path.mailbox
        assert mailbox is not None
        if mailbox.literal:
            await self.reply("553 5.1.3 Address literals are not accepted as recipients",
                             command="RCPT")
            return
        if not mailbox.ascii and not self._txn.smtputf8:
            await self.reply(NEED_SMTPUTF8.reply, command="RCPT")
            return
        if not self.intake.relay_allowed(self.client_ip, self.authenticated):
            await self.reply("554 5.7.1 Relay access denied", command="RCPT",
                             recipient=mailbox.address[:300])
            return
        await self._add_recipient(mailbox.address)

    async def _add_recipient(self, address: str) -> None:
        assert self._txn is not None
        if len(self._txn.recipients) >= self.intake.settings.max_recipients:
            # Expected from a pipelining client with a long list: not an error (the
            # accepted recipients go on to DATA), up to Postfix's overshoot limit.
            self._overshoot += 1
            await self.reply("452 4.5.3 Error: too many recipients", command="RCPT",
                             count=self._overshoot > RECIPIENT_OVERSHOOT)
            return
        self._txn.recipients.append(address)
        await self.push("250 2.1.5 Ok")

    async def _rcpt_postmaster(self) -> None:
        """RCPT TO:<postmaster> (RFC 5321 §4.5.1): accepted from any client, relay
        permission or not, and routed to `ndr.postmaster`; refused (550 5.1.1) only
        when no postmaster address is configured."""
        target = self.intake.settings.postmaster
        if not target:
            await self.reply("550 5.1.1 <postmaster>: no postmaster address is configured "
                             "on this relay", command="RCPT")
            return
        await self._add_recipient(target)

    async def cmd_DATA(self, arg: str) -> None:
        txn = self._txn
        if txn is None:
            await self.reply("503 5.5.1 Error: need MAIL command", command="DATA")
            return
        if not txn.recipients:
            await self.reply("554 5.5.1 Error: no valid recipients", command="DATA")
            return
        if arg:
            await self.reply("501 5.5.4 Syntax: DATA", command="DATA")
            return
        s = self.intake.settings
        # Memory for the message (relay.intake.budget): its declared SIZE, or one piece.
        grant = await self.intake.budget.grant(min(txn.size or PIECE, s.max_message_size))
        if grant is None:
            self._txn = None
            await self.reply(DATA_REPLIES[MEMORY], command="DATA", sender=txn.sender)
            return
        try:
            await self._receive(txn, grant)
        finally:
            grant.release()

    async def _receive(self, txn: Transaction, grant: Grant) -> None:
        s = self.intake.settings
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        self._reset_timeout(s.data_timeout)
        self.in_data = True
        try:
            problem, parts = await read_message(
                self._reader, max_size=s.max_message_size, max_line=s.max_line_length,
                grant=grant)
        finally:
            self.in_data = False
        self._txn = None
        if problem is not None:
            await self.reply(DATA_REPLIES[problem], command="DATA", sender=txn.sender)
            return
        self._reset_timeout(s.command_timeout)
        status, fields = await self.intake.accept(self, txn, parts)
        if status.startswith("250"):
            self.messages += 1
            await self.push(status)
        else:
            await self.reply(status, command="DATA", **fields)
