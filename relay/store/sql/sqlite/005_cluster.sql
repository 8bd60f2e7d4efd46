-- dane-relay schema version 5: the tables a shared queue needs, kept in SQLite too so
-- that both backends run the same code (a single node always holds its singletons).

-- Work that must run on one node at a time (closing TLS-RPT periods, retention, NDR
-- sweeps, cluster gauges): a named lease, taken when free or expired, renewed by its
-- holder.
CREATE TABLE singletons (
    name          TEXT PRIMARY KEY,
    owner         TEXT NOT NULL,
    leased_until  REAL NOT NULL
);

-- The nodes that use this queue, seen by their heartbeats (for operators).
CREATE TABLE nodes (
    owner       TEXT PRIMARY KEY,  -- "<node>/<incarnation>"
    node        TEXT NOT NULL,
    started_at  REAL NOT NULL,
    seen_at     REAL NOT NULL
);

-- The owner of an expired lease a claim took over (set by the claim, from the lease it
-- replaced): the work may have been done before, so a takeover is logged and counted.
ALTER TABLE recipients ADD COLUMN taken_from TEXT;
