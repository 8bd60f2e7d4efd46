-- dane-relay queue schema on PostgreSQL, version 1: the SQLite schema's tables (its
-- migrations 001 to 005), written for PostgreSQL, plus what a
-- shared queue needs: bodies in their own table, node leases, cluster-wide singletons.
-- Times are double precision seconds since the Unix epoch (UTC), as in SQLite, so that
-- the store's records are the same on both; lease times come from the database's clock.

CREATE TABLE messages (
    id           text PRIMARY KEY,
    sender       text NOT NULL,
    received_at  double precision NOT NULL,
    size         bigint NOT NULL,
    headers      bytea NOT NULL DEFAULT '\x',
    smtputf8     integer NOT NULL DEFAULT 0,
    body_8bit    integer NOT NULL DEFAULT 0,
    client_ip    text NOT NULL DEFAULT '',
    client_helo  text NOT NULL DEFAULT '',
    auth_user    text,
    extra        text NOT NULL DEFAULT '{}',
    held         integer NOT NULL DEFAULT 0,
    finished_at  double precision,
    requiretls   integer NOT NULL DEFAULT 0,  -- MAIL FROM ... REQUIRETLS (RFC 8689)
    body_sha256  bytea,                       -- checked before every attempt
    held_reason  text NOT NULL DEFAULT ''     -- why the relay held it ('' for an operator)
);

CREATE INDEX messages_finished ON messages (finished_at) WHERE finished_at IS NOT NULL;

-- The body lives apart: rows of messages stay small for the scans of claims and views,
-- and a finished message drops its body with one DELETE.
CREATE TABLE bodies (
    message_id  text PRIMARY KEY REFERENCES messages (id) ON DELETE CASCADE,
    body        bytea NOT NULL
);

CREATE TABLE recipients (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id       text NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    address          text NOT NULL,
    domain           text NOT NULL,
    status           text NOT NULL DEFAULT 'queued'
                     CHECK (status IN ('queued', 'deferred', 'delivered', 'bounced')),
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  double precision NOT NULL,
    code             text NOT NULL DEFAULT '',
    reply            text NOT NULL DEFAULT '',
    updated_at       double precision NOT NULL,
    lease_owner      text,
    leased_until     double precision,
    ndr_state        text,
    warned_at        double precision,
    taken_from       text  -- the owner of an expired lease the last claim took over
);

CREATE INDEX recipients_message ON recipients (message_id);
CREATE INDEX recipients_due ON recipients (status, next_attempt_at)
    WHERE status IN ('queued', 'deferred');
CREATE INDEX recipients_domain ON recipients (domain, status);
CREATE INDEX recipients_ndr ON recipients (ndr_state) WHERE ndr_state = 'pending';
CREATE INDEX recipients_lease ON recipients (leased_until) WHERE leased_until IS NOT NULL;

CREATE TABLE attempts (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id    text NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    recipient_id  bigint NOT NULL REFERENCES recipients (id) ON DELETE CASCADE,
    at            double precision NOT NULL,
    mx            text NOT NULL DEFAULT '',
    ip            text NOT NULL DEFAULT '',
    dnssec        text NOT NULL DEFAULT '',
    tlsa          text NOT NULL DEFAULT '',
    tls           text NOT NULL DEFAULT '',
    dane          text NOT NULL DEFAULT '',
    code          text NOT NULL DEFAULT '',
    reply         text NOT NULL DEFAULT '',
    policy        text NOT NULL DEFAULT ''   -- the TLS policy the attempt applied
);

CREATE INDEX attempts_recipient ON attempts (recipient_id, at);
CREATE INDEX attempts_message ON attempts (message_id);

-- TLS reporting (RFC 8460): see relay/store/sql/sqlite/002_tlsrpt.sql. A period's begin
-- is unique, so two nodes opening the period at once end up with one.
CREATE TABLE tlsrpt_periods (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    begin_at   double precision NOT NULL UNIQUE,
    end_at     double precision NOT NULL,
    closed_at  double precision
);

CREATE INDEX tlsrpt_periods_open ON tlsrpt_periods (end_at) WHERE closed_at IS NULL;

CREATE TABLE tlsrpt_results (
    period_id       bigint NOT NULL REFERENCES tlsrpt_periods (id) ON DELETE CASCADE,
    policy_domain   text NOT NULL,
    policy_type     text NOT NULL,
    policy_strings  text NOT NULL DEFAULT '[]',
    mx_host         text NOT NULL DEFAULT '',
    result_type     text NOT NULL DEFAULT '',
    sending_ip      text NOT NULL DEFAULT '',
    receiving_ip    text NOT NULL DEFAULT '',
    detail          text NOT NULL DEFAULT '',
    count           bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (period_id, policy_domain, policy_type, policy_strings, mx_host, result_type,
                 sending_ip, receiving_ip)
);

CREATE TABLE tlsrpt_reports (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    period_id        bigint NOT NULL REFERENCES tlsrpt_periods (id) ON DELETE CASCADE,
    policy_domain    text NOT NULL,
    begin_at         double precision NOT NULL,
    end_at           double precision NOT NULL,
    due_at           double precision NOT NULL,
    next_attempt_at  double precision NOT NULL,
    state            text NOT NULL DEFAULT 'pending'
                     CHECK (state IN ('pending', 'sent', 'failed', 'none')),
    attempts         integer NOT NULL DEFAULT 0,
    report_id        text NOT NULL DEFAULT '',
    detail           text NOT NULL DEFAULT '',
    lease_owner      text,
    leased_until     double precision,
    updated_at       double precision NOT NULL,
    UNIQUE (period_id, policy_domain)
);

CREATE INDEX tlsrpt_reports_due ON tlsrpt_reports (next_attempt_at) WHERE state = 'pending';

CREATE TABLE tlsrpt_sends (
    report_id  bigint NOT NULL REFERENCES tlsrpt_reports (id) ON DELETE CASCADE,
    uri        text NOT NULL,
    state      text NOT NULL CHECK (state IN ('sent', 'failed')),
    detail     text NOT NULL DEFAULT '',
    at         double precision NOT NULL,
    PRIMARY KEY (report_id, uri)
);

-- The MTA-STS policy cache (RFC 8461), shared by every node: see
-- relay/store/sql/sqlite/003_mta_sts.sql.
CREATE TABLE sts_policies (
    domain        text PRIMARY KEY,
    policy_id     text NOT NULL DEFAULT '',
    policy        text NOT NULL DEFAULT '',
    mode          text NOT NULL DEFAULT '',
    max_age       bigint NOT NULL DEFAULT 0,
    fetched_at    double precision,
    expires_at    double precision,
    checked_at    double precision,
    failed_at     double precision,
    failed_id     text NOT NULL DEFAULT '',
    failure       text NOT NULL DEFAULT '',
    failure_type  text NOT NULL DEFAULT ''
);

CREATE INDEX sts_policies_expiry ON sts_policies (expires_at);

-- Work that must run on one node at a time (closing TLS-RPT periods, retention, NDR
-- sweeps, cluster gauges): a named lease, taken when free or expired, renewed by its
-- holder. Node ids are "<node>/<incarnation>".
CREATE TABLE singletons (
    name          text PRIMARY KEY,
    owner         text NOT NULL,
    leased_until  double precision NOT NULL
);

-- The nodes that use this queue, seen by their heartbeats (for operators).
CREATE TABLE nodes (
    owner      text PRIMARY KEY,
    node       text NOT NULL,
    started_at double precision NOT NULL,
    seen_at    double precision NOT NULL
);
