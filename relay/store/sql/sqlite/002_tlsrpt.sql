-- dane-relay schema version 2: SMTP TLS reporting (RFC 8460).
-- Times are REAL seconds since the Unix epoch (UTC); period bounds are whole seconds.

-- A reporting period. Results go into the open period whose end is still ahead; a new
-- one starts where the last one ended (or at the interval's grid point). Closing a
-- period (at its end, or early with `relay tlsrpt send --now`) sets closed_at and
-- creates one tlsrpt_reports row per policy domain that has results in it.
CREATE TABLE tlsrpt_periods (
    id         INTEGER PRIMARY KEY,
    begin_at   REAL NOT NULL,
    end_at     REAL NOT NULL,
    closed_at  REAL
);

CREATE INDEX tlsrpt_periods_open ON tlsrpt_periods (end_at) WHERE closed_at IS NULL;

-- Session results, aggregated while they are recorded: one row per distinct key, its
-- count incremented (an upsert per attempted host, in the job's own commit).
CREATE TABLE tlsrpt_results (
    period_id       INTEGER NOT NULL REFERENCES tlsrpt_periods (id) ON DELETE CASCADE,
    policy_domain   TEXT NOT NULL,             -- A-labels, lower case
    policy_type     TEXT NOT NULL,             -- 'tlsa' | 'no-policy-found'
    policy_strings  TEXT NOT NULL DEFAULT '[]',  -- JSON array (TLSA records)
    mx_host         TEXT NOT NULL DEFAULT '',
    result_type     TEXT NOT NULL DEFAULT '',  -- '' for a successful session
    sending_ip      TEXT NOT NULL DEFAULT '',
    receiving_ip    TEXT NOT NULL DEFAULT '',
    detail          TEXT NOT NULL DEFAULT '',  -- failure-reason-code (first one seen)
    count           INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (period_id, policy_domain, policy_type, policy_strings, mx_host, result_type,
                 sending_ip, receiving_ip)
) WITHOUT ROWID;

-- One report: a policy domain and a closed period. Sent once it is due (a random delay
-- after the period's end), to every destination of the domain's TLSRPT record.
CREATE TABLE tlsrpt_reports (
    id               INTEGER PRIMARY KEY,
    period_id        INTEGER NOT NULL REFERENCES tlsrpt_periods (id) ON DELETE CASCADE,
    policy_domain    TEXT NOT NULL,
    begin_at         REAL NOT NULL,
    end_at           REAL NOT NULL,
    due_at           REAL NOT NULL,             -- first due (retries end due_at + lifetime)
    next_attempt_at  REAL NOT NULL,
    state            TEXT NOT NULL DEFAULT 'pending'
                     CHECK (state IN ('pending', 'sent', 'failed', 'none')),
    attempts         INTEGER NOT NULL DEFAULT 0,
    report_id        TEXT NOT NULL DEFAULT '',
    detail           TEXT NOT NULL DEFAULT '',  -- why 'none' / 'failed', or the last error
    lease_owner      TEXT,
    leased_until     REAL,
    updated_at       REAL NOT NULL,
    UNIQUE (period_id, policy_domain)
);

CREATE INDEX tlsrpt_reports_due ON tlsrpt_reports (next_attempt_at) WHERE state = 'pending';

-- Per destination (one rua URI) of a report: mail is enqueued once; HTTPS is retried.
CREATE TABLE tlsrpt_sends (
    report_id  INTEGER NOT NULL REFERENCES tlsrpt_reports (id) ON DELETE CASCADE,
    uri        TEXT NOT NULL,
    state      TEXT NOT NULL CHECK (state IN ('sent', 'failed')),
    detail     TEXT NOT NULL DEFAULT '',      -- queue id of the mail, HTTP status, error
    at         REAL NOT NULL,
    PRIMARY KEY (report_id, uri)
);
