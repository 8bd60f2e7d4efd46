"""Queue ids and recipient domains (pure: no I/O, time is passed in).

Queue id format: 16 characters of Crockford base32 (`0-9A-Z` without `I L O U`, whose
ASCII order is the numeric order), upper case:

    TTTTTTTTTTT CC RRR
    11 chars    2  3

- `T`: microseconds since the Unix epoch (55 bits; enough until the year 3111),
- `C`: a per-process counter (10 bits) for ids within the same microsecond,
- `R`: 15 random bits, so that two processes never collide in practice; with a `tag`
  (intake workers) the first of its characters is the tag and 10 bits are random.

Within one process ids strictly increase (the clock is never allowed to go backwards
for id purposes), so ids sort by arrival; across processes they sort by arrival to the
microsecond. Example: `1K1AC3964VN00YQZ` (2026-11-28, counter 0).
"""

from __future__ import annotations

import secrets

from relay.idn import label_to_ascii

ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
ID_LENGTH = 16
_TS_CHARS, _CTR_CHARS, _RND_CHARS = 11, 2, 3
_CTR_MAX = 32**_CTR_CHARS


def _b32(value: int, width: int) -> str:
    out = []
    for _ in range(width):
        value, digit = divmod(value, 32)
        out.append(ALPHABET[digit])
    if value:
        raise ValueError("value does not fit")
    return "".join(reversed(out))


class IdGenerator:
    """Makes strictly increasing queue ids from the `now` it is given.

    `tag` (0-31): the first random character is fixed to it, so that processes writing
    to one queue with different tags (the intake workers of one relay: relay.workers)
    can never make the same id, also within the same microsecond."""

    def __init__(self, tag: int | None = None) -> None:
        if tag is not None and not 0 <= tag < 32:
            raise ValueError("an id tag is 0 to 31")
        self._last_us = -1
        self._counter = 0
        self._tag = tag

    def next(self, now: float) -> str:
        us = max(int(now * 1_000_000), 0)
        if us <= self._last_us:
            us = self._last_us
            self._counter += 1
            if self._counter >= _CTR_MAX:
                us += 1
                self._counter = 0
        else:
            self._counter = 0
        self._last_us = us
        if self._tag is None:
            rnd = _b32(secrets.randbits(5 * _RND_CHARS), _RND_CHARS)
        else:
            rnd = ALPHABET[self._tag] + _b32(secrets.randbits(5 * (_RND_CHARS - 1)),
                                             _RND_CHARS - 1)
        return _b32(us, _TS_CHARS) + _b32(self._counter, _CTR_CHARS) + rnd


def id_time(queue_id: str) -> float:
    """The arrival time (epoch seconds) encoded in a queue id."""
    us = 0
    for ch in queue_id[:_TS_CHARS]:
        us = us * 32 + ALPHABET.index(ch)
    return us / 1_000_000


def last_id_at(ts: float) -> str:
    """The largest queue id a message received at `ts` (epoch seconds) can have: ids
    sort by arrival, so `id <= last_id_at(t)` selects the messages that arrived by `t`
    (to the microsecond) with an index range instead of a look at every message."""
    us = max(int(ts * 1_000_000), 0)
    return _b32(us, _TS_CHARS) + ALPHABET[-1] * (_CTR_CHARS + _RND_CHARS)


def looks_like_id(text: str) -> bool:
    return len(text) == ID_LENGTH and all(c in ALPHABET for c in text)


def recipient_domain(address: str) -> str:
    """The destination domain of an address: lower case, A-labels where IDNA allows.

    `User@Bücher.Example` → `xn--bcher-kva.example`; address literals (`[192.0.2.1]`)
    are kept as written (lower case). A domain IDNA refuses stays lower-cased Unicode,
    so grouping still works and delivery can report the problem.
    """
    domain = address.rpartition("@")[2].strip().rstrip(".")
    if domain.startswith("["):
        return domain.lower()
    if domain.isascii():
        return domain.lower()
    labels = []
    for label in domain.split("."):
        if label.isascii():
            labels.append(label.lower())
            continue
        try:
            labels.append(label_to_ascii(label))
        except ValueError:
            labels.append(label.lower())
    return ".".join(labels)
