"""Failed SMTP AUTH per client address, across sessions: a growing delay, then a lockout.

Pure: time is passed in. relay.intake.core.Intake keeps one `AuthThrottle` and the
session (relay.intake.tlsauth) asks it: `locked(ip, now)` before an AUTH is even read,
`failed(ip, now)` after a wrong password, which says how long to wait before answering
`535` and whether the address is now locked out (`421 4.7.0` to its AUTH commands for
`lockout` seconds), in the spirit of Postfix's `smtpd_client_auth_rate_limit` and
Dovecot's `auth_failure_delay`.

- The n-th failure of an address within `window` is answered after
  `delay * 2**(n-1)` seconds, at most `delay * MAX_DELAY_FACTOR`.
- The `limit`-th failure within `window` locks the address out for `lockout`; when the
  lockout ends the address starts afresh.
- At most `max_clients` addresses are remembered; past that the ones idle longest are
  forgotten first (an attacker with many addresses cannot grow the table without bound).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

MAX_DELAY_FACTOR = 16


@dataclass
class _Client:
    failures: deque[float] = field(default_factory=deque)
    locked_until: float = 0.0


@dataclass(frozen=True)
class Verdict:
    """What a failed AUTH leads to: wait `delay` seconds before answering; `locked_for`
    seconds of lockout start now (None: not locked); `failures` within the window."""

    delay: float
    failures: int
    locked_for: float | None = None


class AuthThrottle:
    def __init__(self, *, delay: float = 1.0, limit: int = 10, window: float = 600.0,
                 lockout: float = 600.0, max_clients: int = 65536) -> None:
        self.delay = delay
        self.limit = limit
        self.window = window
        self.lockout = lockout
        self.max_clients = max_clients
        self._clients: OrderedDict[str, _Client] = OrderedDict()

    def locked(self, ip: str, now: float) -> float | None:
        """Seconds left of `ip`'s lockout, or None when it may try AUTH."""
        client = self._clients.get(ip)
        if client is None or client.locked_until <= now:
            return None
        return client.locked_until - now

    def failed(self, ip: str, now: float) -> Verdict:
        client = self._clients.pop(ip, None) or _Client()
        self._clients[ip] = client  # most recently used last
        if client.locked_until and client.locked_until <= now:
            client.locked_until = 0.0
            client.failures.clear()
        while client.failures and client.failures[0] <= now - self.window:
            client.failures.popleft()
        client.failures.append(now)
        n = len(client.failures)
        delay = min(self.delay * 2 ** min(n - 1, 30), self.delay * MAX_DELAY_FACTOR)
        self._trim()
        if self.limit and n >= self.limit:
            client.locked_until = now + self.lockout
            client.failures.clear()
            return Verdict(delay, n, self.lockout)
        return Verdict(delay, n)

    def _trim(self) -> None:
        while len(self._clients) > self.max_clients:
            self._clients.popitem(last=False)

    def __len__(self) -> int:
        return len(self._clients)
