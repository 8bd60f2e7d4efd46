-- dane-relay schema version 3: MTA-STS policies (RFC 8461) and REQUIRETLS (RFC 8689).
-- Times are REAL seconds since the Unix epoch (UTC).

-- The MTA-STS policy cache, one row per destination domain (A-labels, lower case),
-- shared by every process (and, later, every node) using this queue. A row may hold
-- only a failure (policy = '') when no policy was ever fetched for the domain.
CREATE TABLE sts_policies (
    domain        TEXT PRIMARY KEY,
    policy_id     TEXT NOT NULL DEFAULT '',   -- id= of the TXT record it was fetched under
    policy        TEXT NOT NULL DEFAULT '',   -- the policy text as served
    mode          TEXT NOT NULL DEFAULT '',   -- enforce | testing | none ('' without one)
    max_age       INTEGER NOT NULL DEFAULT 0, -- seconds (capped at 31557600)
    fetched_at    REAL,
    expires_at    REAL,                       -- fetched_at + max_age
    checked_at    REAL,                       -- last look at the TXT record / fetch
    failed_at     REAL,                       -- last failed fetch (NULL after a success)
    failed_id     TEXT NOT NULL DEFAULT '',   -- the TXT id that fetch was for
    failure       TEXT NOT NULL DEFAULT '',   -- why it failed
    failure_type  TEXT NOT NULL DEFAULT ''    -- RFC 8460 sts-* result type
);

CREATE INDEX sts_policies_expiry ON sts_policies (expires_at);

-- REQUIRETLS (RFC 8689): the client asked for authenticated TLS on every hop.
ALTER TABLE messages ADD COLUMN requiretls INTEGER NOT NULL DEFAULT 0;

-- The TLS policy an attempt applied: "dane", "mta-sts enforce id=… (cached)", ...
ALTER TABLE attempts ADD COLUMN policy TEXT NOT NULL DEFAULT '';
