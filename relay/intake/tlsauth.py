"""STARTTLS and AUTH PLAIN/LOGIN for the intake session (a mixin of IntakeSession).

STARTTLS reuses aiosmtpd's transport swap (which also drops plaintext the client sent
behind the command: no STARTTLS command injection) with our own replies; AUTH is
our own, so none of aiosmtpd's authenticator traps apply: the check runs in a worker
thread (scrypt) and is awaited, failures always get `535 5.7.8`, and AUTH is refused
before TLS (`538 5.7.11`) and when no users are configured (`502 5.5.1`).
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto as sslproto
import binascii
from base64 import b64decode
from typing import TYPE_CHECKING, Any

from aiosmtpd.smtp import MISSING

from relay.log import event

if TYPE_CHECKING:
    from relay.intake.core import Intake

MAX_AUTH_FAILURES = 5  # per session; smtplib alone tries PLAIN, then LOGIN


class TlsAuthCommands:
    """cmd_STARTTLS and cmd_AUTH; the attributes below come from IntakeSession/SMTP."""

    intake: Intake
    sid: str
    client_ip: str
    hostname: str
    auth_user: str | None
    tls_context: Any
    session: Any
    transport: Any
    loop: asyncio.AbstractEventLoop
    _tls_protocol: Any
    _original_transport: Any
    _reader: Any
    _handler_coroutine: Any
    _txn: Any
    _errors: int
    _auth_failures: int
    _close_reason: str

    if TYPE_CHECKING:
        async def reply(self, text: str, *, command: str = "", **fields: Any) -> None: ...
        async def push(self, status: str) -> None: ...
        async def challenge_auth(self, challenge: str) -> Any: ...
        def connection_lost(self, error: Exception | None) -> None: ...
        def _abort(self, reply: str, *, command: str = "", reason: str | None = None) -> None: ...
        @property
        def tls_active(self) -> bool: ...

    async def cmd_STARTTLS(self, arg: str) -> None:
        if arg:
            await self.reply("501 5.5.4 Syntax: STARTTLS", command="STARTTLS")
            return
        if self.tls_context is None:
            await self.reply("502 5.5.1 Error: STARTTLS not available", command="STARTTLS")
            return
        if self._tls_protocol is not None:
            await self.reply("503 5.5.1 Error: TLS already active", command="STARTTLS")
            return
        await self.push("220 2.0.0 Ready to start TLS")
        self._drop_plaintext()
        waiter = self.loop.create_future()
        self._tls_protocol = sslproto.SSLProtocol(
            self.loop, self, self.tls_context, waiter, server_side=True,
            ssl_handshake_timeout=self.intake.settings.line_timeout)
        self._original_transport = self.transport
        assert self._original_transport is not None
        self._original_transport.set_protocol(self._tls_protocol)
        self.transport = self._tls_protocol._app_transport
        self._tls_protocol.connection_made(self._original_transport)
        try:
            await waiter
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            event("rejected", session=self.sid, client_ip=self.client_ip, command="STARTTLS",
                  reply=f"TLS handshake failed: {type(exc).__name__}")
            self._close_reason = "tls_failed"
            self._original_transport.close()
            self.connection_lost(exc)
            if self._handler_coroutine is not None:
                self._handler_coroutine.cancel()

    def _drop_plaintext(self) -> None:
        """Discard what the client sent behind STARTTLS (RFC 3207 §4.2: it is not part
        of the TLS session) and let the socket be read again. asyncio's StreamReader
        pauses the socket once its buffer passes the limit; a socket left paused under
        the TLS handshake would hide the client's close until the handshake timeout,
        holding the connection slot (issue 10 item 4)."""
        reader = self._reader
        buffer = getattr(reader, "_buffer", None)
        if isinstance(buffer, bytearray):
            buffer.clear()
        resume = getattr(reader, "_maybe_resume_transport", None)
        if callable(resume):
            resume()  # clears the reader's own "paused" flag too
        elif self.transport is not None and not self.transport.is_reading():
            self.transport.resume_reading()  # pragma: no cover - older asyncio

    async def cmd_AUTH(self, arg: str) -> None:
        assert self.session is not None
        if not self.intake.auth_enabled:
            await self.reply("502 5.5.1 Error: AUTH not available", command="AUTH")
            return
        if not self.session.host_name or not self.session.extended_smtp:
            await self.reply("503 5.5.1 Error: send EHLO first", command="AUTH")
            return
        if not self.tls_active:
            await self.reply("538 5.7.11 Encryption required for requested authentication "
                             "mechanism", command="AUTH")
            return
        if self.session.authenticated:
            await self.reply("503 5.5.1 Error: already authenticated", command="AUTH")
            return
        if self._txn is not None:
            await self.reply("503 5.5.1 Error: AUTH not permitted during a mail transaction",
                             command="AUTH")
            return
        parts = arg.split(" ")
        if not arg or len(parts) > 2:
            await self.reply("501 5.5.4 Syntax: AUTH mechanism [initial-response]",
                             command="AUTH")
            return
        mech = parts[0].upper()
        initial = parts[1] if len(parts) == 2 else None
        if mech not in ("PLAIN", "LOGIN"):
            await self.reply("504 5.5.4 Unrecognized authentication type", command="AUTH")
            return
        if self._locked_out():
            return
        creds = await self._credentials(mech, initial)
        if creds is None:
            self._errors += 1
            return
        user, password = creds
        async with self.intake.auth_turn(self.client_ip):  # one check at a time per IP
            if self._locked_out():  # another session of this address locked it meanwhile
                return
            ok = await self.intake.authenticate(user, password)
            verdict = None if ok else self.intake.auth_failed(self, user)
            event("auth", session=self.sid, client_ip=self.client_ip, user=user[:64],
                  mechanism=mech, success=ok, delay=verdict.delay if verdict else None)
            if verdict is not None and verdict.delay > 0:
                await asyncio.sleep(verdict.delay)  # answered late; the address waits too
        if ok:
            self.session.authenticated = True
            self.auth_user = user
            self.intake.promote(self)  # may now use the reserved connection slots
            await self.push("235 2.7.0 Authentication successful")
            return
        self._auth_failures += 1
        await self.reply("535 5.7.8 Authentication credentials invalid", command="AUTH")
        if verdict is not None and verdict.locked_for is not None:
            self._locked_out()
        elif self._auth_failures >= MAX_AUTH_FAILURES:
            self._abort(f"421 4.7.0 {self.hostname} Error: too many failed authentications",
                        command="AUTH", reason="auth_failures")

    def _locked_out(self) -> bool:
        """The client's address is locked out (too many failed AUTH): 421 and close."""
        if self.intake.auth_locked(self.client_ip) is None:
            return False
        self._abort(f"421 4.7.0 {self.hostname} Error: too many failed authentications "
                    f"from {self.client_ip}, try again later", command="AUTH",
                    reason="auth_lockout")
        return True

    async def _b64(self, initial: str | None, challenge: str) -> bytes | None:
        if initial is None:
            try:
                got = await self.challenge_auth(challenge)
            except ValueError:  # the stream's line limit: a line far too long
                await self.reply("500 5.5.6 Error: authentication line too long",
                                 command="AUTH")
                return None
            return None if got is MISSING else got  # type: ignore[return-value]
        if initial == "=":
            return b""
        try:
            return b64decode(initial, validate=True)
        except (binascii.Error, ValueError):
            await self.reply("501 5.5.2 Error: cannot decode base64", command="AUTH")
            return None

    async def _credentials(self, mech: str, initial: str | None) -> tuple[str, bytes] | None:
        """(user, password) from the client, or None after a reply was sent."""
        if mech == "PLAIN":
            blob = await self._b64(initial, "")
            if blob is None:
                return None
            fields = blob.split(b"\x00")
            if len(fields) != 3:
                await self.reply("501 5.5.2 Error: malformed PLAIN response", command="AUTH")
                return None
            authz, login, password = fields
            if authz and authz != login:  # no proxy authorization
                login = b"\x00"  # matches no user: a plain failure
        else:
            got = await self._b64(initial, "Username:")
            if got is None:
                return None
            login = got
            pw = await self._b64(None, "Password:")
            if pw is None:
                return None
            password = pw
        try:
            user = login.decode("utf-8")
        except UnicodeDecodeError:
            user = "\x00"
        return user, password
