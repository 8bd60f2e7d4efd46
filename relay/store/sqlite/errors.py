"""Translate sqlite3/OS failures into the relay's storage errors (in one place)."""

from __future__ import annotations

import errno
import sqlite3
from pathlib import Path

from relay.errors import CorruptDatabase, StorageFull, StorageUnavailable, StoreError

SQLITE_BUSY = 5
SQLITE_LOCKED = 6
SQLITE_READONLY = 8
SQLITE_IOERR = 10
SQLITE_CORRUPT = 11
SQLITE_FULL = 13
SQLITE_CANTOPEN = 14
SQLITE_NOTADB = 26

# After these the write connection is closed and opened again for the next batch.
REOPEN = {SQLITE_READONLY, SQLITE_IOERR, SQLITE_CORRUPT, SQLITE_CANTOPEN, SQLITE_NOTADB}


def primary_code(exc: BaseException) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    return None if code is None else code & 0xFF


def is_full(exc: BaseException) -> bool:
    if isinstance(exc, sqlite3.Error):
        return primary_code(exc) == SQLITE_FULL or "disk is full" in str(exc)
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def needs_reopen(exc: BaseException) -> bool:
    if isinstance(exc, sqlite3.Error):
        return primary_code(exc) in REOPEN
    return not isinstance(exc, StoreError)


def storage_error(exc: BaseException, path: Path) -> StoreError:
    """The StoreError for a failure of a write (or read) while the store is running."""
    if isinstance(exc, StoreError):
        return exc
    if is_full(exc):
        return StorageFull(f"queue database {path}: storage full ({exc})")
    code = primary_code(exc)
    if code in (SQLITE_CORRUPT, SQLITE_NOTADB):
        return StorageUnavailable(f"queue database {path} is corrupt ({exc})")
    if code in (SQLITE_BUSY, SQLITE_LOCKED):
        return StorageUnavailable(f"queue database {path} is locked ({exc})")
    return StorageUnavailable(f"queue database {path}: {exc}")


def open_error(exc: BaseException, path: Path) -> StoreError:
    """The StoreError for a failure while opening the database."""
    if isinstance(exc, StoreError):
        return exc
    if primary_code(exc) in (SQLITE_CORRUPT, SQLITE_NOTADB):
        return corrupt(path, str(exc))
    return storage_error(exc, path)


def corrupt(path: Path, detail: str) -> CorruptDatabase:
    return CorruptDatabase(
        f"queue database {path} is corrupt ({detail}); refusing to use it. "
        "Nothing was changed: move the file aside and restore a backup "
        "(relay queue backup), or recover it with the sqlite3 .recover command."
    )
