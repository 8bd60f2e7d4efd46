"""A small HTTPS client pinned to an address our resolver found: the MTA-STS policy
fetch (GET) and TLS-RPT's HTTPS reports (POST).

asyncio streams carry the bytes and h11 (python-hyper's sans-I/O HTTP/1.1) parses them:
status line, headers (bounded: `MAX_HEAD`), chunked or Content-Length bodies, a close
before the end of the body. What the server controls is bounded here: one deadline for
the whole exchange (a slow drip cannot stretch it), a separate one for connect and
handshake, and the body size (reading stops at `max_body` + 1 bytes). The certificate is
checked by the ssl context given (PKIX with the URL's host name: SNI and
check_hostname); the TCP connection goes to `ip`, never to an address the system's
resolver would pick. No redirect is ever followed; the caller sees the 3xx.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import h11

from relay import __version__
from relay.errors import RelayError

MAX_HEAD = 16 * 1024  # bytes of status line + headers
READ = 16 * 1024
USER_AGENT = f"dane-relay/{__version__}"


class HttpsError(RelayError):
    """The exchange failed. `kind`: connect | certificate | tls | timeout | protocol |
    too-large | refused (the caller's `check` refused the response head)."""

    def __init__(self, message: str, *, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Head:
    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]  # lower-case names, in order

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k == name), None)


@dataclass(frozen=True)
class Response:
    head: Head
    body: bytes

    @property
    def status(self) -> int:
        return self.head.status


async def request(host: str, ip: str, path: str, *, context: ssl.SSLContext,
                  port: int = 443, method: str = "GET", body: bytes | None = None,
                  headers: Sequence[tuple[str, str]] = (), connect_timeout: float = 10.0,
                  total_timeout: float = 20.0, max_body: int = 65536,
                  check: Callable[[Head], str | None] | None = None) -> Response:
    """One HTTPS request to `ip`:`port` for `https://host/path`. Raises HttpsError.

    `check(head)` may refuse a response by its status and headers (returns why); the
    body is then not read."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(total_timeout):
            try:
                async with asyncio.timeout(connect_timeout):
                    reader, writer = await asyncio.open_connection(
                        ip, port, ssl=context, server_hostname=host,
                        ssl_handshake_timeout=connect_timeout)
            except ssl.SSLCertVerificationError as exc:
                why = f"{exc.reason}: {exc.verify_message}" if exc.verify_message else str(exc)
                raise HttpsError(f"certificate of {host} [{ip}]: {why}",
                                 kind="certificate") from None
            except ssl.SSLError as exc:
                raise HttpsError(f"TLS with {host} [{ip}]: {exc}", kind="tls") from None
            except TimeoutError:
                raise HttpsError(f"connect to {host} [{ip}]:{port}: timeout after "
                                 f"{connect_timeout:g}s", kind="timeout") from None
            except OSError as exc:
                raise HttpsError(f"connect to {host} [{ip}]:{port}: {exc.strerror or exc}",
                                 kind="connect") from None
            return await _exchange(reader, writer, host, path, method, body, headers,
                                   max_body, check)
    except TimeoutError:
        raise HttpsError(f"{host} [{ip}]: no complete response within {total_timeout:g}s",
                         kind="timeout") from None
    finally:
        if writer is not None:
            writer.transport.abort()  # never wait for a hostile server's close_notify


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str,
                    path: str, method: str, body: bytes | None,
                    headers: Sequence[tuple[str, str]], max_body: int,
                    check: Callable[[Head], str | None] | None) -> Response:
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
    fields = [("Host", host), ("User-Agent", USER_AGENT), ("Connection", "close"),
              *headers]
    if body is not None:
        fields.append(("Content-Length", str(len(body))))
    try:
        out = conn.send(h11.Request(method=method, target=path, headers=fields))
        if body:
            out += conn.send(h11.Data(data=body))
        out += conn.send(h11.EndOfMessage())
        writer.write(out)
        await writer.drain()
        head: Head | None = None
        chunks: list[bytes] = []
        size = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                try:
                    data = await reader.read(READ)
                except (OSError, ssl.SSLError) as exc:
                    raise HttpsError(f"{host}: connection lost: {exc}", kind="protocol") from None
                conn.receive_data(data)
            elif isinstance(event, h11.Response):
                head = Head(event.status_code, event.reason.decode("latin-1"),
                            tuple((k.decode("latin-1").lower(), v.decode("latin-1"))
                                  for k, v in event.headers))
                why = check(head) if check else None
                if why:
                    raise HttpsError(why, kind="refused")
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > max_body:
                    raise HttpsError(f"{host}: response body larger than {max_body} bytes",
                                     kind="too-large")
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                if head is None:
                    raise HttpsError(f"{host}: connection closed without a response",
                                     kind="protocol")
                return Response(head, b"".join(chunks))
    except h11.RemoteProtocolError as exc:
        raise HttpsError(f"{host}: malformed HTTP response: {exc}", kind="protocol") from None
    except (OSError, ssl.SSLError) as exc:
        raise HttpsError(f"{host}: {exc}", kind="protocol") from None
