"""Translate asyncpg/OS failures into the relay's storage errors (in one place)."""

from __future__ import annotations

import asyncpg

from relay.errors import StorageFull, StorageUnavailable, StoreError

# SQLSTATE classes: 08 connection exception, 57 operator intervention (shutdown),
# 53 insufficient resources (53100 disk full), 23 integrity constraint violation.
_RECONNECT_CLASSES = ("08", "57", "53")


def sqlstate(exc: BaseException) -> str:
    return str(getattr(exc, "sqlstate", "") or "")


def is_full(exc: BaseException) -> bool:
    return sqlstate(exc) in ("53100", "53200")


def logical(exc: BaseException) -> bool:
    """A failure of one statement's own (a constraint), not of the database."""
    return sqlstate(exc).startswith("23")


def needs_reopen(exc: BaseException) -> bool:
    if isinstance(exc, asyncpg.PostgresError):
        return sqlstate(exc)[:2] in _RECONNECT_CLASSES
    return not isinstance(exc, StoreError)  # connection lost, timeouts, OS errors


def storage_error(exc: BaseException, where: str) -> StoreError:
    if isinstance(exc, StoreError):
        return exc
    if is_full(exc):
        return StorageFull(f"queue database {where}: storage full ({exc})")
    if isinstance(exc, OSError | TimeoutError) \
            or sqlstate(exc)[:2] in ("08", "57"):
        return StorageUnavailable(f"queue database {where} is unreachable "
                                  f"({type(exc).__name__}: {exc})")
    return StorageUnavailable(f"queue database {where}: {type(exc).__name__}: {exc}")
