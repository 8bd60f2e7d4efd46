"""The intake's memory budget for messages in flight, shared by every session.

A message's octets are held in memory from the moment they arrive until its COMMIT has
returned (then the session lets go of them). Without a bound, N concurrent maximum-size
messages cost N times the size limit, several times over: with 200 connections that is
gigabytes and an out-of-memory kill. `listener.data_memory_limit` bounds the memory of
all messages in flight together, each charged `COPIES` (2) times its size:

- at `DATA`, a session asks for its first grant: the size the client declared with
  `MAIL FROM ... SIZE=`, or one piece (relay.intake.data.PIECE) when it declared none;
  when the budget cannot cover it, the session waits (up to `wait` seconds, in arrival
  order), then is refused with `451 4.3.1` before its `354`: nothing was sent yet;
- while the data arrives, the grant grows piece by piece without waiting (a message
  larger than it declared); when the budget is spent the rest of the message is read
  and dropped, and the final dot is answered `451 4.3.1`;
- the grant is given back once the message is committed (or refused, or the client
  went away).

`return_freed_memory()` keeps freed message buffers from staying in the process: see
its docstring.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
from collections import deque

MEMORY_WAIT = 30.0  # seconds DATA waits for its first grant before 451 4.3.1
# A message is charged twice its size: while it is being committed the relay holds the
# message and the store's copy of it (SQLite binds a copy of the blob); while it arrives,
# its parts and, at the end, the parts joined into one body.
COPIES = 2
# Blocks from this size up are mmap'ed and given back when freed: above asyncio's 256 KiB
# socket read buffer (allocated for every recv: mmap'ing it would cost two system calls
# and page faults per read), below a message body of any size worth returning.
MMAP_THRESHOLD = 1024 * 1024


class MemoryBudget:
    """`limit` octets of memory shared by the grants; `used` is what they hold now."""

    def __init__(self, limit: int, *, wait: float = MEMORY_WAIT) -> None:
        self.limit = limit
        self.wait = wait
        self.used = 0
        self.peak = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    def _take(self, size: int) -> bool:
        if self.used + size > self.limit:
            return False
        self.used += size
        self.peak = max(self.peak, self.used)
        return True

    async def grant(self, size: int) -> Grant | None:
        """A grant for a message of `size` octets (charged `COPIES` times), waiting up
        to `wait` seconds behind earlier asks; None when it could not be had."""
        size = min(max(size, 0) * COPIES, self.limit)
        if not self._waiters and self._take(size):
            return Grant(self, size)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (size, fut)
        self._waiters.append(entry)
        try:
            async with asyncio.timeout(self.wait):
                await fut
        except TimeoutError:
            pass
        except asyncio.CancelledError:
            if _granted(fut):  # granted in the same instant: give it back
                self._release(size)
            raise
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(entry)
        return Grant(self, size) if _granted(fut) else None

    def _release(self, size: int) -> None:
        self.used -= size
        while self._waiters:
            size_wanted, fut = self._waiters[0]
            if fut.done():  # timed out or cancelled meanwhile
                self._waiters.popleft()
                continue
            if not self._take(size_wanted):
                break
            self._waiters.popleft()
            fut.set_result(None)


def _granted(fut: asyncio.Future[None]) -> bool:
    return fut.done() and not fut.cancelled()


class Grant:
    """The octets granted to one message; grows without waiting; `release()` once."""

    def __init__(self, budget: MemoryBudget, size: int) -> None:
        self.budget = budget
        self.held = size  # octets taken from the budget
        self.used = 0  # octets of message kept so far

    def grow(self, size: int) -> bool:
        """Room for `size` more octets of message (charged `COPIES` times): from what is
        held, else from the budget."""
        size *= COPIES
        need = self.used + size - self.held
        if need > 0:
            # never waits, and goes before waiting asks: a message being received is
            # finished (and its memory freed) sooner than one not yet started
            if not self.budget._take(need):
                return False
            self.held += need
        self.used += size
        return True

    def shrink(self) -> None:
        """The kept octets were dropped (the message is refused): give them back."""
        self.used = 0

    def release(self) -> None:
        held, self.held, self.used = self.held, 0, 0
        if held:
            self.budget._release(held)


def return_freed_memory() -> bool:
    """Make glibc give large freed blocks back to the system at once.

    A message body is one large allocation (megabytes). glibc serves the first ones
    with mmap and returns them when freed, but then raises its mmap threshold to the
    size of the block just freed, so later bodies come from the heap and their memory
    stays with the process after the message is committed (RSS only grows). A fixed
    threshold (`MMAP_THRESHOLD`) turns that adaptation off. Returns False where it
    cannot be done (not glibc)."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, MMAP_THRESHOLD)
        libc.mallopt(m_trim_threshold, MMAP_THRESHOLD)
        return bool(ok)
    return False
