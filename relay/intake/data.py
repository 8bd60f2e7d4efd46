"""Reading message data (after `354`) from the raw stream, SMTP-smuggling safe.

The end of data is CRLF "." CRLF and nothing else (RFC 5321 §4.1.1.4). A bare CR, a
bare LF or a NUL anywhere in the data refuses the whole message (`550 5.5.2`): these
are the fake ends of data that other MTAs accept ("SMTP smuggling"). Reading always
continues to the real end, so bytes the client sent as data are never run as commands.

Fast path: one `readuntil(CRLF.CRLF)` with the stream limit raised to the message size
limit, then C-speed checks (`count`, `replace`) over the whole message (it touches two
private attributes of asyncio.StreamReader, `_buffer` and `_limit`, stable since 3.4;
without them the slow path runs). Slow path (a message larger than the limit, or no
private attributes): line by line, counting the size as it arrives and keeping nothing
once the message is known to be refused. Memory per session stays within about twice
the size limit (the stream pauses the socket beyond that).
"""

from __future__ import annotations

import asyncio

BARE = "bare"
TOO_BIG = "size"
TOO_LONG = "line"

REPLIES = {
    BARE: "550 5.5.2 Message refused: bare CR, bare LF or NUL in message data "
          "(lines must end with CRLF)",
    TOO_BIG: "552 5.3.4 Message size exceeds fixed maximum message size",
    TOO_LONG: "500 5.5.2 Message line too long (see RFC 5321 section 4.5.3.1.6)",
}

END = b"\r\n.\r\n"
SLACK = 65536  # dot-stuffing may make the raw data a little larger than the message


def bare_characters(raw: bytes) -> bool:
    """True when `raw` has a CR or LF that is not part of a CRLF pair, or a NUL."""
    crlf = raw.count(b"\r\n")
    return b"\x00" in raw or raw.count(b"\r") != crlf or raw.count(b"\n") != crlf


def longest_line(raw: bytes, limit: int) -> bool:
    """True when a line of `raw` (CRLF-separated) is longer than `limit` octets."""
    if len(raw) <= limit:
        return False
    return max(map(len, raw.split(b"\r\n"))) > limit


async def read_message(reader: asyncio.StreamReader, *, max_size: int,
                       max_line: int) -> tuple[str | None, bytes]:
    """(problem, body): problem is None, BARE, TOO_BIG or TOO_LONG (the first seen);
    the body is dot-unstuffed with CRLF line ends (empty after a problem)."""
    buffer = getattr(reader, "_buffer", None)
    saved = getattr(reader, "_limit", None)
    if not isinstance(buffer, bytearray) or not isinstance(saved, int):
        return await _line_by_line(reader, max_size, [], 0, None)
    # A virtual line end in front of the data, so that CRLF.CRLF also matches the
    # "." of an empty message; it is removed again below, whatever happens.
    buffer[0:0] = b"\r\n"
    reader._limit = max_size + SLACK  # type: ignore[attr-defined]
    try:
        raw: bytes | None = await reader.readuntil(END)
    except asyncio.LimitOverrunError:
        raw = None  # nothing was consumed
    finally:
        reader._limit = saved  # type: ignore[attr-defined]
    if raw is None:
        del buffer[:2]
        return await _line_by_line(reader, max_size, [], 0, None)
    raw = raw[2:-3]  # without the virtual CRLF and the final ".CRLF"
    body = (b"\r\n" + raw).replace(b"\r\n.", b"\r\n")[2:]
    problems = {BARE} if bare_characters(raw) else set()
    if longest_line(raw, max_line):
        problems.add(TOO_LONG)
    if len(body) > max_size:
        problems.add(TOO_BIG)
    return (_worst(problems), b"") if problems else (None, body)


def _worst(problems: set[str]) -> str:
    return next(p for p in (BARE, TOO_LONG, TOO_BIG) if p in problems)


async def _line_by_line(reader: asyncio.StreamReader, max_size: int, parts: list[bytes],
                        size: int, problem: str | None) -> tuple[str | None, bytes]:
    """The slow path, from the start of a line. The reply names the worst problem."""
    problems = {problem} if problem else set()
    line_start = True
    while True:
        try:
            chunk = await reader.readuntil(b"\r\n")
            complete = True
        except asyncio.LimitOverrunError as exc:
            chunk = await reader.readexactly(exc.consumed)
            complete = False
            problems.add(TOO_LONG)
        if line_start and chunk == b".\r\n":
            break
        # a CRLF is never split between two chunks (readuntil would have found it), so
        # in a chunk without its CRLF every CR and LF is bare
        content = chunk[:-2] if complete else chunk
        if b"\r" in content or b"\n" in content or b"\x00" in content:
            problems.add(BARE)
        if line_start and chunk[:1] == b".":
            chunk = chunk[1:]
        size += len(chunk)
        if size > max_size:
            problems.add(TOO_BIG)
        if problems:
            parts.clear()
        else:
            parts.append(chunk)
        line_start = complete
    return (_worst(problems), b"") if problems else (None, b"".join(parts))
