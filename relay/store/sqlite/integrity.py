"""The integrity check of a SQLite queue as `relay serve` runs it (`check="auto"`).

When (relay.store.sqlite.runstate decides from what the last run left):

- the last run stopped cleanly and its check was done: no check;
- it did not stop cleanly (crash, kill -9, power loss; or there is no record of it), or
  it left a check unfinished: the check runs in the background while the relay accepts
  mail;
- it found the file damaged: the check runs **before** anything else; the file is
  refused while it fails, and passing (the file was restored or repaired) clears it.

A new queue file needs none. The check is SQLite's `PRAGMA quick_check` (every page of
every table and index, without comparing index contents to their tables) on a connection
of its own in a thread: it does not hold the event loop, nor the write lock (WAL: the
writer goes on beside a reader). A check still running when the relay stops is
interrupted and owed at the next start.

When the background check finds damage: the `integrity_check` event (level error) names
the file and what is wrong, the state says `damaged` (so the next start refuses the file
until it passes the check), and every further write of this process fails at once with
StorageUnavailable (intake answers `451 4.3.0`, nothing more is written into a damaged
file); relay.app then drains and stops the relay (exit 1).
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

from relay import log
from relay.store.sqlite import errors as errs
from relay.store.sqlite.runstate import DAMAGED, OK, PENDING, RUNNING, STOPPED, RunMarker


def quick_check(path: Path, *, timeout: float = 5.0,
                register: Callable[[sqlite3.Connection], None] | None = None) -> str | None:
    """`PRAGMA quick_check` on a read-only connection of its own: None when the file is
    sound, else what is wrong. `register(conn)` is told the connection (so that another
    thread can interrupt it: InterruptedError)."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=timeout,
                               check_same_thread=False)
    except sqlite3.Error as exc:
        return f"cannot open it: {exc}"
    try:
        if register is not None:
            register(conn)
        rows = [str(r[0]) for r in conn.execute("PRAGMA quick_check").fetchall()]
    except sqlite3.OperationalError as exc:
        if "interrupted" in str(exc):
            raise InterruptedError("integrity check interrupted") from None
        return f"quick_check failed: {exc}"
    except sqlite3.DatabaseError as exc:
        return f"quick_check failed: {exc}"
    finally:
        conn.close()
    return None if rows == ["ok"] else "quick_check: " + "; ".join(rows[:5])


class Integrity:
    """The check of one `relay serve` process: `plan()` before the database is opened,
    `start()` once it is open, `close()` when it is closed."""

    def __init__(self, db: Path) -> None:
        self.db = db
        self.marker = RunMarker(db)
        self.reason = ""  # why a background check runs ("" when none)
        self.damaged: asyncio.Future[str] | None = None
        self._task: asyncio.Task[None] | None = None
        self._conn: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._closing = False

    def plan(self, *, new: bool) -> None:
        """Read what the last run left; check now if it found damage (CorruptDatabase
        while the file fails); decide on a background check; record this run."""
        found = self.marker.acquire()
        check, self.reason = PENDING, ""
        if new:
            check = OK
        elif found.check == DAMAGED:
            began = time.monotonic()
            problem = quick_check(self.db)
            if problem is not None:
                self.marker.record(state=RUNNING, check=DAMAGED, detail=problem)
                self.marker.release(clean=False)
                raise errs.corrupt(self.db, problem)
            log.event("integrity_check", path=str(self.db), result="ok",
                      reason="found damaged before", seconds=round(time.monotonic() - began, 3),
                      background=False)
            check = OK
        elif self.marker.alone and found.state == RUNNING:
            self.reason = "unclean stop"
        elif found.check == PENDING:
            self.reason = "the last check did not finish"
        elif found.check == OK and (found.state == STOPPED or not self.marker.alone):
            check = OK
        else:
            self.reason = "no record of the last stop"
        self.marker.record(state=RUNNING, check=check, detail=self.reason)
        self.marker.running()

    def start(self, on_damage: Callable[[str], None]) -> None:
        """Run the background check if one is owed; `on_damage(detail)` fences the
        store's writes the moment damage is found."""
        loop = asyncio.get_running_loop()
        self.damaged = loop.create_future()
        if self.marker.current.check == PENDING:
            self._task = loop.create_task(self._run(on_damage), name="integrity-check")

    async def _run(self, on_damage: Callable[[str], None]) -> None:
        assert self.damaged is not None
        began = time.monotonic()
        log.event("integrity_check", path=str(self.db), result="started", reason=self.reason,
                  background=True)
        try:
            problem = await asyncio.to_thread(self._check)
        except InterruptedError:
            return  # the relay is stopping: still owed at the next start
        seconds = round(time.monotonic() - began, 3)
        if problem is None:
            self.marker.record(check=OK, detail="")
            log.event("integrity_check", path=str(self.db), result="ok", reason=self.reason,
                      seconds=seconds, background=True)
            return
        on_damage(problem)  # first: nothing more is written into the file
        self.marker.record(check=DAMAGED, detail=problem)
        log.event("integrity_check", level="error", path=str(self.db), result="damaged",
                  reason=self.reason, seconds=seconds, background=True, detail=problem,
                  action="intake and delivery stopped; the relay stops and refuses the file "
                         "until it passes the check (restore a backup or recover it)")
        if not self.damaged.done():
            self.damaged.set_result(problem)

    def _check(self) -> str | None:
        def register(conn: sqlite3.Connection) -> None:
            with self._lock:
                if self._closing:
                    raise InterruptedError("integrity check interrupted")
                self._conn.append(conn)

        return quick_check(self.db, register=register)

    async def close(self, *, clean: bool = True) -> None:
        """Interrupt a check still running, then record a clean stop (if this process
        is the last one on the file)."""
        with self._lock:
            self._closing = True
        task = self._task
        while task is not None and not task.done():
            # an interrupt that comes before the statement has begun is lost: repeat it
            with self._lock:
                for conn in self._conn:
                    conn.interrupt()
            await asyncio.wait({task}, timeout=0.05)
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)
        self.marker.release(clean=clean)
