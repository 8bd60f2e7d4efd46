"""Reading message data (after `354`) from the raw stream, SMTP-smuggling safe and with
bounded memory.

The end of data is CRLF "." CRLF and nothing else (RFC 5321 §4.1.1.4). A bare CR, a
bare LF or a NUL anywhere in the data refuses the whole message (`550 5.5.2`): these
are the fake ends of data that other MTAs accept ("SMTP smuggling"). Reading always
continues to the real end, so bytes the client sent as data are never run as commands.

Memory: the data is read in pieces of at most `piece` octets (`readuntil(CRLF.CRLF)`
with the stream limit lowered to the piece size; it touches two private attributes of
asyncio.StreamReader, `_buffer` and `_limit`, stable since 3.4; without them the
line-by-line path runs). Each piece is checked (bare CR/LF/NUL, line length, size) and
dot-unstuffed as it comes, with a carried CR so that no CRLF is split between pieces,
and kept as one part of the body; nothing is kept once the message is known to be
refused. So a message costs its own size in parts, never a second whole copy in the
stream's buffer. Every part is charged to `grant` (relay.intake.budget): when the
intake's budget for messages in flight cannot cover it, the rest is read and dropped
and the reply is `451 4.3.1` (`MEMORY`).
"""

from __future__ import annotations

import asyncio
from typing import Protocol

BARE = "bare"
TOO_BIG = "size"
TOO_LONG = "line"
MEMORY = "memory"

REPLIES = {
    BARE: "550 5.5.2 Message refused: bare CR, bare LF or NUL in message data "
          "(lines must end with CRLF)",
    TOO_BIG: "552 5.3.4 Message size exceeds fixed maximum message size",
    TOO_LONG: "500 5.5.2 Message line too long (see RFC 5321 section 4.5.3.1.6)",
    MEMORY: "451 4.3.1 Insufficient system resources: too much mail in flight, try again "
            "later",
}

END = b"\r\n.\r\n"
PIECE = 65536  # octets read, checked and kept at a time


class Grant(Protocol):
    """Memory granted to one message (relay.intake.budget.Grant)."""

    def grow(self, size: int) -> bool: ...

    def shrink(self) -> None: ...


class _Unlimited:
    def grow(self, size: int) -> bool:
        return True

    def shrink(self) -> None:
        pass


def bare_characters(raw: bytes) -> bool:
    """True when `raw` has a CR or LF that is not part of a CRLF pair, or a NUL."""
    crlf = raw.count(b"\r\n")
    return b"\x00" in raw or raw.count(b"\r") != crlf or raw.count(b"\n") != crlf


class _Body:
    """The checks and the kept parts, fed piece by piece."""

    def __init__(self, max_size: int, max_line: int, grant: Grant) -> None:
        self.max_size = max_size
        self.max_line = max_line
        self.grant = grant
        self.parts: list[bytes] = []
        self.problems: set[str] = set()
        self.size = 0
        self.line_start = True  # the next octet begins a line
        self.line_len = 0  # octets of the current, unfinished line

    def feed(self, seg: bytes) -> None:
        """A piece of raw data that splits no CRLF (a trailing CR is carried over)."""
        if not seg:
            return
        if bare_characters(seg):
            self.problems.add(BARE)
        if self.line_len + len(seg) > self.max_line:
            lines = seg.split(b"\r\n")
            first = self.line_len + len(lines[0])
            if max(first, max(map(len, lines[1:]), default=0)) > self.max_line:
                self.problems.add(TOO_LONG)
            self.line_len = len(lines[-1]) if len(lines) > 1 else first
        else:
            end = seg.rfind(b"\r\n")
            self.line_len = self.line_len + len(seg) if end < 0 else len(seg) - end - 2
        if self.line_start:
            seg = (b"\r\n" + seg).replace(b"\r\n.", b"\r\n")[2:]
        else:
            seg = seg.replace(b"\r\n.", b"\r\n")
        self.line_start = seg.endswith(b"\r\n")
        self.size += len(seg)
        if self.size > self.max_size:
            self.problems.add(TOO_BIG)
        if not self.problems and not self.grant.grow(len(seg)):
            self.problems.add(MEMORY)
        if self.problems:
            if self.parts:
                self.parts.clear()
                self.grant.shrink()
        else:
            self.parts.append(seg)

    def result(self) -> tuple[str | None, list[bytes]]:
        return (_worst(self.problems), []) if self.problems else (None, self.parts)


async def read_message(reader: asyncio.StreamReader, *, max_size: int, max_line: int,
                       grant: Grant | None = None, piece: int = PIECE
                       ) -> tuple[str | None, list[bytes]]:
    """(problem, parts): problem is None, BARE, TOO_BIG, TOO_LONG or MEMORY (the worst
    seen); the parts joined are the body, dot-unstuffed with CRLF line ends (none after
    a problem)."""
    body = _Body(max_size, max_line, grant or _Unlimited())
    buffer = getattr(reader, "_buffer", None)
    saved = getattr(reader, "_limit", None)
    if not isinstance(buffer, bytearray) or not isinstance(saved, int):
        return await _line_by_line(reader, body)
    # A virtual line end in front of the data, so that CRLF.CRLF also matches the
    # "." of an empty message; it is removed from the first piece.
    buffer[0:0] = b"\r\n"
    reader._limit = max(piece, len(END))  # type: ignore[attr-defined]
    first, carry = True, b""
    try:
        while True:
            try:
                raw = await reader.readuntil(END)
                final = True
            except asyncio.LimitOverrunError as exc:
                raw = await reader.readexactly(exc.consumed)
                final = False
            if first:
                raw, first = raw[2:], False
            if final:
                body.feed(carry + raw[:-3])  # without the final ".CRLF"
                return body.result()
            raw = carry + raw
            carry = b"\r" if raw.endswith(b"\r") else b""
            body.feed(raw[:-1] if carry else raw)
    finally:
        if first:
            del buffer[:2]
        reader._limit = saved  # type: ignore[attr-defined]


def _worst(problems: set[str]) -> str:
    return next(p for p in (BARE, TOO_LONG, TOO_BIG, MEMORY) if p in problems)


async def _line_by_line(reader: asyncio.StreamReader, body: _Body
                        ) -> tuple[str | None, list[bytes]]:
    """Without the stream's private attributes: line by line (the stream's own limit
    bounds a piece). The reply names the worst problem."""
    while True:
        try:
            chunk = await reader.readuntil(b"\r\n")
            complete = True
        except asyncio.LimitOverrunError as exc:
            chunk = await reader.readexactly(exc.consumed)
            complete = False
        if body.line_start and complete and chunk == b".\r\n":
            return body.result()
        # readuntil never splits a CRLF between two chunks (it would have found it),
        # so a CR at the end of an incomplete chunk is a bare one, as feed() sees it
        body.feed(chunk)
