"""The timers of one intake session (a mixin of relay.intake.session.IntakeSession).

Three deadlines, one timer (aiosmtpd's `_timeout_handle`, which ends the session with
`421 4.4.2` through `_timeout_cb`):

- waiting for a command: `listener.command_timeout` (5 minutes), as Postfix's
  smtpd_timeout;
- once the first byte of a command line has arrived: the rest of the line within
  `listener.line_timeout` (30 s). aiosmtpd restarts its timer for every line, so a
  client that drips one byte at a time (slowloris) held its connection as long as it
  liked; here the deadline only ever moves closer while a line is incomplete;
- untrusted sessions (not from allowed_networks, not authenticated) while their share
  of the connections is full (relay.intake.core.Intake.stressed): both timeouts shrink
  to `listener.stress_command_timeout` (10 s), for the sessions already waiting too
  (`under_stress`), as Postfix does under stress.

The DATA phase keeps its own deadline (`listener.data_timeout`), set by the session.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from relay.intake.core import Intake


class SessionTimers:
    """Command and partial-line deadlines; the attributes come from IntakeSession/SMTP."""

    intake: Intake
    loop: asyncio.AbstractEventLoop
    trusted: bool
    _reader: Any
    _timeout_handle: asyncio.TimerHandle | None
    _timeout_duration: float
    _deadline = 0.0  # loop time at which the current timer fires
    _awaiting = False  # waiting for (the rest of) a command line
    _line_started = False  # ...and a byte of it has arrived
    _shortened = False  # the timer runs shorter than the command timeout

    if TYPE_CHECKING:
        def _timeout_cb(self) -> None: ...

    def _reset_timeout(self, duration: float | None = None) -> None:
        seconds = duration or self._timeout_duration
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()
        self._deadline = self.loop.time() + seconds
        self._timeout_handle = self.loop.call_later(seconds, self._timeout_cb)

    def _shorten(self, seconds: float) -> None:
        """Bring the timer forward to `seconds` from now; never push it back."""
        if self._timeout_handle is not None and self.loop.time() + seconds < self._deadline:
            self._shortened = True
            self._reset_timeout(seconds)

    def _stressed(self) -> bool:
        return not self.trusted and self.intake.stressed

    def _line_limit(self) -> float:
        s = self.intake.settings
        return min(s.line_timeout, s.stress_timeout) if self._stressed() else s.line_timeout

    def _command_wait(self) -> float:
        s = self.intake.settings
        return min(s.command_timeout, s.stress_timeout) if self._stressed() \
            else s.command_timeout

    def begin_command_wait(self) -> None:
        """Before reading a command line: the idle deadline, or the partial-line one when
        an unfinished line is already buffered (a drip, or pipelining)."""
        wait = self._command_wait()
        buffer = getattr(self._reader, "_buffer", None)
        self._line_started = bool(buffer)
        self._awaiting = True
        line = self._line_limit()
        self._shortened = bool(buffer) and b"\n" not in buffer and line < wait
        self._reset_timeout(line if self._shortened else wait)

    def end_command_wait(self) -> None:
        """The line is in: the command itself has the command timeout again (not what
        was left of the line's deadline). Nothing to do for a line that came whole."""
        self._awaiting = False
        if self._shortened:
            self._shortened = False
            self._reset_timeout(self._command_wait())

    def data_received(self, data: bytes) -> None:
        super().data_received(data)  # type: ignore[misc]
        if self._awaiting and not self._line_started:
            self._line_started = True
            if b"\n" not in data:  # a line begun and not finished: its own deadline
                self._shorten(self._line_limit())

    def under_stress(self) -> None:
        """The untrusted share of the connections is full: an untrusted session that is
        waiting for a command gets `stress_command_timeout` at most from now."""
        if self._awaiting and not self.trusted:
            self._shorten(self.intake.settings.stress_timeout)
