"""Whether a SQLite queue needs its integrity check, kept beside the file (`<db>-run`).

`PRAGMA quick_check` reads every page of the file: 60 s to minutes at 1 M queued
messages (6 GB). Run before the listener, it made the start-up time grow with the depth
of the queue (167 s at 1 M). It is only needed when the file may have been damaged:

- after an **unclean stop** (a crash, kill -9, OOM, power loss): SQLite's WAL makes a
  crash itself harmless, but what stops a machine abruptly (power, a kernel, a disk that
  lies about its cache) is also what damages files;
- while a check that found damage, or that did not finish, is still owed.

`relay serve` records its run here: `running` when it opens the queue, `stopped` when it
closed it cleanly, and the state of the check (`ok`, `pending`, `damaged` with the
detail). A start after a clean stop checks nothing; after an unclean stop (or a check
that did not finish) the check runs in the background while the relay already accepts
mail (relay.store.sqlite.backend); a file found damaged is checked again before the next
start goes any further, and refused while it is damaged.

Several processes on one file: each holds a shared `flock` on this file while it runs.
A start that can take it exclusively is alone: a `running` state is then left by a
process that died. The process that stops last (exclusive again) writes `stopped`; a
process that stops while others run leaves `running` as it is. A file that cannot be
read or parsed counts as an unclean stop (the safe side: a check in the background).

The file is small and rewritten in place (write + fsync): a write torn by a crash reads
as garbage, which means "check". Nothing in it is needed to read the queue: deleting it
costs one background check.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RUNNING, STOPPED = "running", "stopped"
OK, PENDING, DAMAGED = "ok", "pending", "damaged"


def marker_path(db: Path) -> Path:
    return db.with_name(db.name + "-run")


@dataclass
class RunState:
    state: str = ""  # RUNNING | STOPPED | "" (unknown: no file, unreadable)
    check: str = ""  # OK | PENDING | DAMAGED | "" (unknown)
    detail: str = ""  # why a check is owed, or what it found
    since: str = ""  # when `check` got its value (UTC, ISO 8601)

    @classmethod
    def parse(cls, raw: bytes) -> RunState:
        try:
            data: Any = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return cls()
        if not isinstance(data, dict):
            return cls()
        return cls(**{k: str(data.get(k) or "") for k in ("state", "check", "detail", "since")})

    def dumps(self) -> bytes:
        return (json.dumps({"state": self.state, "check": self.check, "detail": self.detail,
                            "since": self.since, "pid": os.getpid()}) + "\n").encode()


def _utc_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class RunMarker:
    """The `<db>-run` file of one `relay serve` process: open it with `acquire()` before
    the database is opened, `release()` after the database is closed."""

    def __init__(self, db: Path) -> None:
        self.path = marker_path(db)
        self._fd: int | None = None
        self.alone = False
        self.found = RunState()  # what the previous run left
        self.current = RunState()

    def acquire(self) -> RunState:
        """Open (creating) and lock the file; returns the state the last run left."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._fd = fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.alone = True
        except BlockingIOError:
            fcntl.flock(fd, fcntl.LOCK_SH)
            self.alone = False
        self.found = RunState.parse(os.pread(fd, 4096, 0))
        return self.found

    def record(self, *, state: str | None = None, check: str | None = None,
               detail: str | None = None) -> None:
        """Change the fields given (the others as the file says now: a sibling process
        may have written them) and write the state durably (fsync)."""
        assert self._fd is not None
        cur = RunState.parse(os.pread(self._fd, 4096, 0))
        if check is not None and check != cur.check:
            cur.since = _utc_now()
        self.current = RunState(state=state or cur.state,
                                check=cur.check if check is None else check,
                                detail=cur.detail if detail is None else detail,
                                since=cur.since)
        self._write(self.current)

    def running(self) -> None:
        """The state is written: from now on this run holds the file shared (others may
        start beside it)."""
        assert self._fd is not None
        if self.alone:
            fcntl.flock(self._fd, fcntl.LOCK_SH)  # let siblings start

    def _write(self, state: RunState) -> None:
        assert self._fd is not None
        data = state.dumps()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)
        os.fsync(self._fd)

    def release(self, *, clean: bool) -> None:
        """At the end of the run: `stopped` if this process is the last one (and
        `clean`), then unlock and close."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if clean:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    pass  # another relay process still runs on this file: it stops last
                else:
                    self._fd = fd
                    self.record(state=STOPPED)
                    self._fd = None
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)  # closing drops the lock


def read_state(db: Path) -> RunState | None:
    """The state as the file says now (for `relay health`); None without a file."""
    try:
        return RunState.parse(marker_path(db).read_bytes()[:4096])
    except FileNotFoundError:
        return None
