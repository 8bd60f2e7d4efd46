"""Connection reuse for delivery: idle SMTP sessions kept for the next message to the
same host under the same policy (Postfix's connection cache).

A session is cached only after a transaction ended cleanly and the server is ready for
another (`SmtpSession.usable`). The key holds everything the session was judged under —
address, port, TLS requirement, SNI, the usable TLSA records, the reference names and
the relaxed flag — so a session authenticated under one policy is never used under
another. Limits as in Postfix: an idle time (`delivery.connection_cache_time`, like
smtp_connection_cache_time_limit), a number of transactions per connection
(`delivery.connection_reuse_limit`) and an age (`delivery.connection_reuse_time`, like
smtp_connection_reuse_time_limit). Idle sessions are closed politely (QUIT) when they
expire or when the relay stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from relay.smtp.client import SmtpSession


@dataclass
class _Idle:
    session: SmtpSession
    state: Any  # what the caller needs to reuse it (TLS info, DANE text, ...)
    born: float
    idle_since: float


class SessionPool:
    def __init__(self, *, idle_time: float = 2.0, max_uses: int = 100,
                 max_age: float = 300.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.idle_time = idle_time
        self.max_uses = max_uses
        self.max_age = max_age
        self.clock = clock
        self._idle: dict[Hashable, list[_Idle]] = {}
        self._born: dict[int, float] = {}
        self._reaper: asyncio.TimerHandle | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self.reused = 0

    @property
    def enabled(self) -> bool:
        return self.idle_time > 0 and self.max_uses > 1

    def take(self, key: Hashable) -> tuple[SmtpSession, Any] | None:
        """The most recently used idle session for `key` that is still good, or None."""
        now = self.clock()
        stack = self._idle.get(key)
        while stack:
            item = stack.pop()
            if self._fresh(item, now):
                self.reused += 1
                return item.session, item.state
            self._retire(item.session)
        return None

    def give(self, key: Hashable, session: SmtpSession, state: Any) -> bool:
        """Keep `session` for reuse if it can take another transaction; else QUIT it."""
        now = self.clock()
        born = self._born.setdefault(id(session), now)
        item = _Idle(session, state, born, now)
        if not self.enabled or not self._fresh(item, now):
            self._retire(session)
            return False
        self._idle.setdefault(key, []).append(item)
        self._schedule()
        return True

    def forget(self, session: SmtpSession) -> None:
        self._born.pop(id(session), None)

    def _fresh(self, item: _Idle, now: float) -> bool:
        s = item.session
        return (s.usable and s.transactions < self.max_uses
                and now - item.born < self.max_age and now - item.idle_since < self.idle_time)

    def _retire(self, session: SmtpSession) -> None:
        self._born.pop(id(session), None)
        if session.closed:
            session.close()
            return
        task = asyncio.ensure_future(self._quit(session))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    @staticmethod
    async def _quit(session: SmtpSession) -> None:
        with contextlib.suppress(Exception):
            await session.quit()
        session.close()

    def _schedule(self) -> None:
        if self._reaper is None:
            loop = asyncio.get_running_loop()
            self._reaper = loop.call_later(self.idle_time, self._reap)

    def _reap(self) -> None:
        self._reaper = None
        now = self.clock()
        for key, stack in list(self._idle.items()):
            keep = [i for i in stack if self._fresh(i, now)]
            for item in stack:
                if item not in keep:
                    self._retire(item.session)
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]
        if self._idle:
            self._schedule()

    def idle_count(self) -> int:
        return sum(len(s) for s in self._idle.values())

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        for stack in self._idle.values():
            for item in stack:
                self._retire(item.session)
        self._idle.clear()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
