-- dane-relay queue schema, version 1.
-- Applied once by relay.store.migrate when PRAGMA user_version < 1.
-- Times are REAL seconds since the Unix epoch (UTC).

CREATE TABLE messages (
    id           TEXT PRIMARY KEY,            -- queue id (relay.store.ids), sorts by arrival
    sender       TEXT NOT NULL,               -- '' for the null sender
    received_at  REAL NOT NULL,
    size         INTEGER NOT NULL,            -- octets of the body as accepted
    body         BLOB,                        -- NULL once every recipient is final
    headers      BLOB NOT NULL DEFAULT x'',   -- the header section, kept for NDRs
    smtputf8     INTEGER NOT NULL DEFAULT 0,
    body_8bit    INTEGER NOT NULL DEFAULT 0,
    client_ip    TEXT NOT NULL DEFAULT '',
    client_helo  TEXT NOT NULL DEFAULT '',
    auth_user    TEXT,
    extra        TEXT NOT NULL DEFAULT '{}',  -- JSON object of str -> str
    held         INTEGER NOT NULL DEFAULT 0,
    finished_at  REAL                         -- set when every recipient is final
);

CREATE INDEX messages_finished ON messages (finished_at) WHERE finished_at IS NOT NULL;

CREATE TABLE recipients (
    id               INTEGER PRIMARY KEY,
    message_id       TEXT NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    address          TEXT NOT NULL,
    domain           TEXT NOT NULL,            -- lower-case, A-labels (IDNA) where possible
    status           TEXT NOT NULL DEFAULT 'queued'
                     CHECK (status IN ('queued', 'deferred', 'delivered', 'bounced')),
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  REAL NOT NULL,
    code             TEXT NOT NULL DEFAULT '',  -- enhanced status code of the last result
    reply            TEXT NOT NULL DEFAULT '',
    updated_at       REAL NOT NULL,
    lease_owner      TEXT,
    leased_until     REAL,
    ndr_state        TEXT,                      -- NULL | 'pending' | 'sent' | 'none'
    warned_at        REAL                       -- when a delay warning was sent
);

CREATE INDEX recipients_message ON recipients (message_id);
CREATE INDEX recipients_due ON recipients (status, next_attempt_at);
CREATE INDEX recipients_domain ON recipients (domain, status);
CREATE INDEX recipients_ndr ON recipients (ndr_state) WHERE ndr_state = 'pending';

CREATE TABLE attempts (
    id            INTEGER PRIMARY KEY,
    message_id    TEXT NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    recipient_id  INTEGER NOT NULL REFERENCES recipients (id) ON DELETE CASCADE,
    at            REAL NOT NULL,
    mx            TEXT NOT NULL DEFAULT '',
    ip            TEXT NOT NULL DEFAULT '',
    dnssec        TEXT NOT NULL DEFAULT '',    -- secure | insecure | bogus | ''
    tlsa          TEXT NOT NULL DEFAULT '',    -- e.g. 'none', 'usable', 'unusable', the records
    tls           TEXT NOT NULL DEFAULT '',    -- e.g. 'TLSv1.3 TLS_AES_256_GCM_SHA384'
    dane          TEXT NOT NULL DEFAULT '',    -- result and matched record
    code          TEXT NOT NULL DEFAULT '',
    reply         TEXT NOT NULL DEFAULT ''
);

CREATE INDEX attempts_recipient ON attempts (recipient_id, at);
CREATE INDEX attempts_message ON attempts (message_id);

CREATE INDEX recipients_lease ON recipients (leased_until) WHERE leased_until IS NOT NULL;
