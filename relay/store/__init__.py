"""The durable queue: SQLite (WAL, synchronous=FULL), group commit, claims, trace.

All SQL of the project lives in this package (`sql/*.sql`). See relay.store.store.Store.
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
