"""The durable queue: SQLite (WAL, synchronous=FULL), group commit, claims, trace.

All SQL of the project lives in this package (`sql/*.sql`). See relay.store.store.Store.

May import: the base only. It knows nothing of delivery, intake or TLS reporting: they
hand it values (relay.model) and read values back (.records).
"""

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
    "recipient_domain",
]
