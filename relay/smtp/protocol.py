"""Sans-I/O SMTP client core: replies, EHLO keywords, commands, body encoding, session states.

Pure: no asyncio, socket or ssl here. The driver (relay.smtp.client) moves bytes; this
module decides what the bytes mean. Everything a hostile server controls is bounded:
line length, lines per reply and the bytes held while waiting for a line end.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from relay.errors import RelayError

MAX_LINE = 2048  # RFC 5321 §4.5.3.1.5 says 512 octets; real servers exceed it a little
MAX_LINES = 100  # lines in one (multiline) reply


class ProtocolViolation(RelayError):
    """The remote server broke the protocol (malformed or oversized reply)."""


class LocalProtocolError(RelayError):
    """We were asked to do something the session state does not allow (a bug here)."""


# --- replies ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """One (possibly multiline) server reply.

    `lines`: the text of each line after the code and separator, as sent.
    `enhanced`: the RFC 3463 code ("5.1.1") when the server advertised
    ENHANCEDSTATUSCODES and the reply carries one, else None.
    `text`: the human text, lines joined with "\\n", enhanced code removed.
    """

    code: int
    enhanced: str | None
    text: str
    lines: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    @property
    def transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        return 500 <= self.code < 600

    def __str__(self) -> str:
        """One line for traces and NDRs: `550 5.1.1 no such user`."""
        parts = [str(self.code)]
        if self.enhanced:
            parts.append(self.enhanced)
        flat = " ".join(s for s in self.text.split("\n") if s)
        if flat:
            parts.append(flat)
        return " ".join(parts)


_CODE_LINE = re.compile(rb"([2-5][0-5][0-9])([ -]|$)")
_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?= |$)")


def make_reply(code: int, lines: Iterable[str], *, enhanced_codes: bool = False) -> Reply:
    """Build a Reply from its line texts (the parser's and the client's one constructor)."""
    raw = tuple(lines) or ("",)
    enhanced: str | None = None
    if enhanced_codes:
        m = _ENHANCED.match(raw[0])
        if m and m.group(1) == str(code)[0]:
            enhanced = m.group(0)
    texts: list[str] = []
    for line in raw:
        if enhanced and line.startswith(enhanced):
            line = line[len(enhanced):].lstrip(" ")
        texts.append(line)
    return Reply(code, enhanced, "\n".join(texts), raw)


def local_reply(code: int, enhanced: str, text: str) -> Reply:
    """A reply we make up ourselves (e.g. a size refusal decided before sending)."""
    return Reply(code, enhanced, text, (f"{enhanced} {text}",))


class ReplyParser:
    """Feed bytes in, get complete replies out. Bounded; raises ProtocolViolation."""

    def __init__(self, *, max_line: int = MAX_LINE, max_lines: int = MAX_LINES) -> None:
        self.max_line = max_line
        self.max_lines = max_lines
        self.enhanced_codes = False  # set once the server advertised ENHANCEDSTATUSCODES
        self._buf = bytearray()
        self._code: int | None = None
        self._lines: list[str] = []

    @property
    def buffered(self) -> bool:
        """True when bytes of an unfinished reply are held (matters before a TLS handshake)."""
        return bool(self._buf) or self._code is not None

    def feed(self, data: bytes) -> list[Reply]:
        self._buf += data
        out: list[Reply] = []
        while True:
            end = self._buf.find(b"\n")
            if end < 0:
                if len(self._buf) > self.max_line + 1:
                    raise ProtocolViolation(f"reply line longer than {self.max_line} octets")
                return out
            line = bytes(self._buf[:end])
            del self._buf[: end + 1]
            if line.endswith(b"\r"):
                line = line[:-1]
            reply = self._line(line)
            if reply is not None:
                out.append(reply)

    def _line(self, line: bytes) -> Reply | None:
        if len(line) > self.max_line:
            raise ProtocolViolation(f"reply line longer than {self.max_line} octets")
        m = _CODE_LINE.match(line)
        if not m:
            shown = line[:60].decode("ascii", "backslashreplace")
            raise ProtocolViolation(f"malformed reply line: {shown!r}")
        code = int(m.group(1))
        if self._code is not None and code != self._code:
            raise ProtocolViolation(f"reply code changed inside a multiline reply ({code})")
        self._code = code
        self._lines.append(line[4:].decode("utf-8", "replace"))
        if len(self._lines) > self.max_lines:
            raise ProtocolViolation(f"reply longer than {self.max_lines} lines")
        if m.group(2) == b"-":
            return None
        lines, self._code, self._lines = self._lines, None, []
        return make_reply(code, lines, enhanced_codes=self.enhanced_codes)


# --- EHLO keywords ---------------------------------------------------------------------


@dataclass(frozen=True)
class Extensions:
    """The service extensions a server advertised in its EHLO reply."""

    keywords: Mapping[str, str] = field(default_factory=dict)  # KEYWORD -> parameters
    esmtp: bool = False  # False after a HELO fallback

    @property
    def size(self) -> int | None:
        """The server's fixed maximum message size; None when none is declared (or 0)."""
        raw = self.keywords.get("SIZE")
        if raw is None:
            return None
        first = raw.split(" ", 1)[0]
        if not (first.isascii() and first.isdigit() and len(first) <= 20):
            return None  # "SIZE ²" or garbage: no usable limit
        return int(first) or None

    @property
    def pipelining(self) -> bool:
        return "PIPELINING" in self.keywords

    @property
    def starttls(self) -> bool:
        return "STARTTLS" in self.keywords

    @property
    def smtputf8(self) -> bool:
        return "SMTPUTF8" in self.keywords

    @property
    def eightbitmime(self) -> bool:
        return "8BITMIME" in self.keywords

    @property
    def enhanced_status_codes(self) -> bool:
        return "ENHANCEDSTATUSCODES" in self.keywords

    def __contains__(self, keyword: object) -> bool:
        return isinstance(keyword, str) and keyword.upper() in self.keywords


def parse_ehlo(reply: Reply) -> Extensions:
    """Keywords from an EHLO reply: the first line is the server's name, then one per line.

    CHUNKING and anything else unknown are kept in `keywords` but never used.
    """
    keywords: dict[str, str] = {}
    for line in reply.lines[1:]:
        word, _, params = line.strip().partition(" ")
        if word and word.replace("-", "").isalnum():
            keywords[word.upper()] = params.strip()
    return Extensions(keywords, esmtp=True)


# --- commands --------------------------------------------------------------------------

DATA = b"DATA\r\n"
RSET = b"RSET\r\n"
QUIT = b"QUIT\r\n"
STARTTLS = b"STARTTLS\r\n"
NOOP = b"NOOP\r\n"

_BAD_IN_ADDRESS = re.compile(r"[\x00-\x1f\x7f<>]")
_BAD_IN_NAME = re.compile(r"[\x00-\x20\x7f]")


def _name_arg(name: str) -> bytes:
    if not name or _BAD_IN_NAME.search(name) or not name.isascii():
        raise LocalProtocolError(f"unusable HELO name: {name!r}")
    return name.encode("ascii")


def ehlo(name: str) -> bytes:
    return b"EHLO " + _name_arg(name) + b"\r\n"


def helo(name: str) -> bytes:
    return b"HELO " + _name_arg(name) + b"\r\n"


def _path(address: str, smtputf8: bool) -> bytes:
    """`<address>`; refuses anything that could end or split the command line."""
    if _BAD_IN_ADDRESS.search(address):
        raise LocalProtocolError(f"address with control characters or brackets: {address!r}")
    if not address.isascii() and not smtputf8:
        raise LocalProtocolError(f"non-ASCII address needs SMTPUTF8: {address!r}")
    return b"<" + address.encode("utf-8") + b">"


def needs_smtputf8(sender: str, recipients: Iterable[str]) -> bool:
    return not sender.isascii() or any(not r.isascii() for r in recipients)


def mail_from(sender: str, *, size: int | None = None, body_8bit: bool = False,
              smtputf8: bool = False, requiretls: bool = False) -> bytes:
    """MAIL FROM:<sender> with SIZE=, BODY=8BITMIME, SMTPUTF8 and REQUIRETLS (RFC 8689) as
    asked (null sender: "")."""
    cmd = b"MAIL FROM:" + _path(sender, smtputf8)
    if size is not None:
        cmd += b" SIZE=%d" % size
    if body_8bit:
        cmd += b" BODY=8BITMIME"
    if smtputf8:
        cmd += b" SMTPUTF8"
    if requiretls:
        cmd += b" REQUIRETLS"
    return cmd + b"\r\n"


def rcpt_to(recipient: str, *, smtputf8: bool = False) -> bytes:
    if not recipient:
        raise LocalProtocolError("empty recipient address")
    return b"RCPT TO:" + _path(recipient, smtputf8) + b"\r\n"


# --- body ------------------------------------------------------------------------------

_EOL = re.compile(rb"\r\n|\r|\n")
_LEADING_DOT = re.compile(rb"^\.", re.MULTILINE)


def encode_body(body: bytes) -> bytes:
    """The DATA payload: CRLF line ends, dot-stuffed, ending with CRLF.CRLF.

    The queue already stores CRLF line ends; a bare CR or LF is made a CRLF all the same
    (never sent bare: RFC 5321 §2.3.8). Nothing else about the body is changed.
    """
    crlf = body.count(b"\r\n")
    if body.count(b"\r") != crlf or body.count(b"\n") != crlf:  # a bare CR or LF somewhere
        body = _EOL.sub(b"\r\n", body)
    if body.startswith(b".") or b"\n." in body:
        body = _LEADING_DOT.sub(b"..", body)
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    return body + b".\r\n"


# --- session states (h11-style table) ---------------------------------------------------


class State(StrEnum):
    CONNECTED = "connected"  # waiting for the greeting
    GREETED = "greeted"  # greeting (or TLS handshake) done: EHLO/HELO next
    READY = "ready"  # EHLO/HELO accepted: STARTTLS or MAIL
    TLS = "tls"  # STARTTLS answered 220: handshake running
    MAIL = "mail"  # MAIL accepted
    RCPT = "rcpt"  # at least one RCPT accepted
    DATA = "data"  # 354 received: the body is on its way
    CLOSED = "closed"


class Event(StrEnum):
    GREETING = "greeting"
    HELLO = "hello"
    STARTTLS = "starttls"
    TLS_DONE = "tls_done"
    MAIL_OK = "mail_ok"
    RCPT_OK = "rcpt_ok"
    DATA_GO = "data_go"
    DATA_DONE = "data_done"
    RESET = "reset"
    CLOSE = "close"


_TRANSITIONS: dict[tuple[State, Event], State] = {
    (State.CONNECTED, Event.GREETING): State.GREETED,
    (State.GREETED, Event.HELLO): State.READY,
    (State.READY, Event.HELLO): State.READY,
    (State.READY, Event.STARTTLS): State.TLS,
    (State.TLS, Event.TLS_DONE): State.GREETED,  # RFC 3207 §4.2: forget, EHLO again
    (State.READY, Event.MAIL_OK): State.MAIL,
    (State.MAIL, Event.RCPT_OK): State.RCPT,
    (State.RCPT, Event.RCPT_OK): State.RCPT,
    (State.RCPT, Event.DATA_GO): State.DATA,
    (State.DATA, Event.DATA_DONE): State.READY,
    (State.READY, Event.RESET): State.READY,
    (State.MAIL, Event.RESET): State.READY,
    (State.RCPT, Event.RESET): State.READY,
}


class SessionState:
    """Where the session is; refuses steps out of order (e.g. MAIL before EHLO, a
    second STARTTLS, anything after the connection was given up)."""

    def __init__(self) -> None:
        self.state = State.CONNECTED
        self.tls = False

    def can(self, event: Event) -> bool:
        if event is Event.CLOSE:
            return True
        if event is Event.STARTTLS and self.tls:
            return False
        return (self.state, event) in _TRANSITIONS

    def advance(self, event: Event) -> State:
        if not self.can(event):
            raise LocalProtocolError(f"{event.value} not allowed in state {self.state.value}")
        if event is Event.CLOSE:
            self.state = State.CLOSED
            return self.state
        if event is Event.TLS_DONE:
            self.tls = True
        self.state = _TRANSITIONS[(self.state, event)]
        return self.state


# --- transactions ----------------------------------------------------------------------


@dataclass(frozen=True)
class TransactionResult:
    """What happened to one message on one session; every reply is a value.

    `refused`: a refusal decided before sending anything (SIZE: 5.3.4, SMTPUTF8: 5.6.7).
    `mail`: the MAIL reply (None when not sent).
    `recipients`: address -> RCPT reply, in the order sent.
    `data`: the DATA reply when it was not 354, else the end-of-data reply; None when no
    recipient was accepted. If the server closed (421) before DATA, that 421.
    """

    mail: Reply | None
    recipients: Mapping[str, Reply]
    data: Reply | None
    refused: Reply | None = None
    pipelined: bool = False

    def reply_for(self, recipient: str) -> Reply:
        """The reply that decides this recipient's outcome."""
        if self.refused is not None:
            return self.refused
        if self.mail is None:
            raise LocalProtocolError("no MAIL reply in a transaction that was not refused")
        if not self.mail.ok:
            return self.mail
        rcpt = self.recipients[recipient]
        if not rcpt.ok or self.data is None:
            return rcpt
        return self.data

    @property
    def delivered(self) -> tuple[str, ...]:
        """Recipients the server took responsibility for (RCPT 2xx and end-of-data 2xx)."""
        if self.data is None or not self.data.ok:
            return ()
        return tuple(a for a, r in self.recipients.items() if r.ok)


def precheck(ext: Extensions, *, size: int, smtputf8: bool) -> Reply | None:
    """Refusals decided from the EHLO keywords before sending MAIL (None: go ahead)."""
    if smtputf8 and not ext.smtputf8:
        return local_reply(
            553, "5.6.7", "destination does not support SMTPUTF8, which this message needs"
        )
    limit = ext.size
    if limit is not None and size > limit:
        return local_reply(
            552, "5.3.4", f"message size {size} exceeds the destination's limit of {limit}"
        )
    return None


@dataclass(frozen=True)
class TlsInfo:
    version: str  # "TLSv1.3"
    cipher: str  # "TLS_AES_256_GCM_SHA384"
    bits: int | None
    chain: tuple[bytes, ...]  # DER, leaf first, as presented (unverified)
    server_hostname: str | None  # the SNI we sent
