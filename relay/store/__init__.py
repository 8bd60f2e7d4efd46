"""The durable queue behind one interface (relay.store.store.Store): SQLite (WAL,
synchronous=FULL; the embedded default) or PostgreSQL (several nodes, one queue); group
commit, claims and leases, trace, TLS-RPT tables, cluster singletons.

All SQL of the project lives in this package (`sql/<backend>/*.sql`); the backends
(.sqlite, .pg) bring connections, SQL and error mapping, the logic is shared.

May import: the base only. It knows nothing of delivery, intake or TLS reporting: they
hand it values (relay.model) and read values back (.records).
"""

import asyncio

from relay.config import QueueConfig
from relay.store.ids import recipient_domain
from relay.store.records import (
    Attempt,
    AttemptTrace,
    Job,
    JobResult,
    MessageInfo,
    RecipientInfo,
    RecipientUpdate,
    Stats,
    iso,
)
from relay.store.store import Store


async def store_health(queue: QueueConfig) -> tuple[bool, str]:
    """(ok, detail) of the configured queue for `relay health`, without opening a Store."""
    if queue.url:
        from relay.store.pg.backend import health as pg_health

        return await pg_health(queue.url)
    from relay.store.sqlite.backend import health as sqlite_health

    return await asyncio.to_thread(sqlite_health, queue.path)


async def open_store(queue: QueueConfig, *, check: bool | str = True,
                     create: bool = True, write_turns: bool = False) -> Store:
    """The configured queue: PostgreSQL when `queue.url` is set, else the SQLite file
    (`check`, `write_turns`: see Store.open; PostgreSQL answers for its own files)."""
    if queue.url:
        return await Store.open_url(queue.url, commit_batch=queue.commit_batch,
                                    readers=queue.readers)
    return await Store.open(queue.path, commit_batch=queue.commit_batch, check=check,
                            create=create, readers=queue.readers, write_turns=write_turns)

__all__ = [
    "Attempt",
    "AttemptTrace",
    "Job",
    "JobResult",
    "MessageInfo",
    "RecipientInfo",
    "RecipientUpdate",
    "Stats",
    "Store",
    "iso",
    "open_store",
    "recipient_domain",
    "store_health",
]
