"""The asyncio protocol under an SMTP session: bytes in, parsed replies out.

Every byte received goes into the bounded sans-I/O parser, so the session always knows
whether anything is buffered (the STARTTLS injection check needs exactly that, which
asyncio's StreamReader does not expose). Also write flow control and the connection's fate.
"""

from __future__ import annotations

import asyncio
from collections import deque

from relay.smtp.protocol import ProtocolViolation, Reply, ReplyParser


class ReplyStream(asyncio.Protocol):
    """Bytes in → parsed replies; write flow control; the connection's fate."""

    def __init__(self) -> None:
        self.parser = ReplyParser()
        self.transport: asyncio.Transport | None = None
        self.replies: deque[Reply] = deque()
        self.error: BaseException | None = None
        self.lost = False
        self._waiter: asyncio.Future[None] | None = None
        self._writable = asyncio.Event()
        self._writable.set()

    @property
    def pending(self) -> bool:
        """Anything received that nobody asked for yet (complete or partial)."""
        return bool(self.replies) or self.parser.buffered

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.error is not None:
            return
        try:
            self.replies.extend(self.parser.feed(data))
        except ProtocolViolation as exc:
            self.error = exc
            if self.transport is not None:
                self.transport.abort()
        self._wake()

    def eof_received(self) -> bool:
        self._fail(ConnectionResetError("connection closed by the server"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._fail(exc or ConnectionResetError("connection closed by the server"))
        self._writable.set()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def next_reply(self) -> Reply:
        while not self.replies:
            if self.error is not None:
                raise self.error
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self.replies.popleft()

    async def drain(self) -> None:
        await self._writable.wait()
        if self.lost:
            raise self.error or ConnectionResetError("connection lost")
