-- Named queries of the SQLite store (relay/store/sql/pg/queries.sql has the same names).
-- Each starts with a line `-- name: <name>`.
-- Parameters: positional (?) on the hot intake path, named (:x) elsewhere.

-- name: insert_message
INSERT INTO messages (id, sender, received_at, size, body, headers, smtputf8, body_8bit,
                      client_ip, client_helo, auth_user, extra, requiretls,
                      body_sha256)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?);

-- name: insert_recipient
INSERT INTO recipients (message_id, address, domain, next_attempt_at, updated_at)
VALUES (?, ?, ?, ?, ?);

-- name: claim
-- Due recipients, leased atomically, whole (message, domain) groups at a time.
-- Fairness: the oldest-due groups of never-tried mail and of deferred mail are picked
-- in turn (row numbers interleave), so a backlog of retries never starves new mail
-- and the other way round.
-- Limits (relay.delivery.destinations): :caps is a JSON object {domain: free} for the
-- domains the scheduler keeps state for: free = how many more groups the domain may
-- start now (0: at its limit, skipped); -1 = dead: its due groups are handed out apart,
-- up to :dead_limit beyond :limit, found through recipients_domain, for the scheduler
-- to defer at once without a connection. A domain not in :caps may start :initial. At
-- most :limit groups of live domains, of which at most :retry_limit of deferred mail.
-- Only the :window oldest due rows of each kind are looked at (recipients_due holds
-- the domain: skipping a row of a domain at its limit reads no table row).
WITH caps AS (
    SELECT key AS domain, value AS free FROM json_each(:caps)
), skip AS (
    SELECT domain FROM caps WHERE free <= 0
), fresh AS (
    SELECT r.message_id, r.domain, min(r.next_attempt_at) AS due FROM (
        SELECT r.id, r.message_id, r.domain, r.next_attempt_at
        FROM (
            SELECT id, domain FROM recipients
            WHERE status = 'queued' AND next_attempt_at <= :now
            ORDER BY next_attempt_at, id LIMIT :window
        ) AS w CROSS JOIN recipients r ON r.id = w.id CROSS JOIN messages m
          ON m.id = r.message_id  -- in the window's order (CROSS: w stays outermost)
        WHERE w.domain NOT IN (SELECT domain FROM skip) AND m.held = 0
          AND (r.leased_until IS NULL OR r.leased_until <= :now)
        LIMIT :scan
    ) AS r GROUP BY r.message_id, r.domain
), retry AS (
    SELECT r.message_id, r.domain, min(r.next_attempt_at) AS due FROM (
        SELECT r.id, r.message_id, r.domain, r.next_attempt_at
        FROM (
            SELECT id, domain FROM recipients
            WHERE status = 'deferred' AND next_attempt_at <= :now
            ORDER BY next_attempt_at, id LIMIT :window
        ) AS w CROSS JOIN recipients r ON r.id = w.id CROSS JOIN messages m
          ON m.id = r.message_id  -- in the window's order (CROSS: w stays outermost)
        WHERE w.domain NOT IN (SELECT domain FROM skip) AND m.held = 0
          AND (r.leased_until IS NULL OR r.leased_until <= :now)
        LIMIT :scan
    ) AS r GROUP BY r.message_id, r.domain
), dead AS (
    SELECT r.message_id, r.domain, min(r.next_attempt_at) AS due FROM (
        SELECT r.id, r.message_id, r.domain, r.next_attempt_at
        FROM caps c CROSS JOIN recipients r ON r.domain = c.domain  -- caps outermost
             JOIN messages m ON m.id = r.message_id
        WHERE c.free < 0 AND r.status IN ('queued', 'deferred')
          AND r.next_attempt_at <= :now AND m.held = 0
          AND (r.leased_until IS NULL OR r.leased_until <= :now)
        LIMIT :dead_scan
    ) AS r GROUP BY r.message_id, r.domain
), groups AS (
    SELECT message_id, domain, row_number() OVER (ORDER BY due, message_id) AS rn, 0 AS k
    FROM fresh
    UNION ALL
    SELECT message_id, domain, row_number() OVER (ORDER BY due, message_id) AS rn, 1 AS k
    FROM retry
), capped AS (
    SELECT g.message_id, g.domain, g.rn, g.k, coalesce(c.free, :initial) AS free,
           row_number() OVER (PARTITION BY g.domain ORDER BY g.rn, g.k) AS dn
    FROM groups g LEFT JOIN caps c ON c.domain = g.domain
), ranked AS (
    SELECT message_id, domain, k, row_number() OVER (PARTITION BY k ORDER BY rn) AS kn
    FROM capped WHERE dn <= free
), picked AS (
    SELECT message_id, domain FROM (
        SELECT message_id, domain FROM ranked
        WHERE kn <= CASE k WHEN 0 THEN :limit ELSE :retry_limit END
        ORDER BY kn, k LIMIT :limit
    )
    UNION ALL
    SELECT message_id, domain FROM (
        SELECT message_id, domain FROM dead ORDER BY due, message_id LIMIT :dead_limit
    )
)
-- taken_from: the owner of the expired lease this claim replaces (SET sees old values)
UPDATE recipients SET taken_from = lease_owner, lease_owner = :owner, leased_until = :until
WHERE id IN (
    -- unary + keeps the planner on recipients_message (a group's few rows), not on
    -- recipients_due (every due row) for this lookup
    SELECT r.id FROM picked p JOIN recipients r
      ON r.message_id = p.message_id AND +r.domain = p.domain
    WHERE +r.status IN ('queued', 'deferred') AND +r.next_attempt_at <= :now
      AND (r.leased_until IS NULL OR r.leased_until <= :now)
)
RETURNING id, message_id, domain, address, attempts, status, next_attempt_at,
          taken_from;

-- name: job_messages
-- The messages of claimed work; the body (with its digest) comes along when the
-- message is no larger than :inline octets (no separate load_body for it).
SELECT id, sender, received_at, smtputf8, size, coalesce(json_extract(extra, '$.kind'), ''),
       requiretls, CASE WHEN size <= :inline THEN body END,
       CASE WHEN size <= :inline THEN body_sha256 END
FROM messages WHERE id IN (SELECT value FROM json_each(:ids));

-- name: unlease
-- through the leased rows only (recipients_lease), whatever the depth of the queue
UPDATE recipients INDEXED BY recipients_lease SET lease_owner = NULL, leased_until = NULL
WHERE leased_until IS NOT NULL AND lease_owner = :owner AND (:ids IS NULL OR id IN (SELECT value FROM json_each(:ids)));

-- name: renew_lease
-- A worker still busy with its job pushes its lease forward (heartbeat), so that the
-- work is not claimed a second time while the attempt is still running.
-- NOT INDEXED here and below: the rows by id (rowid), never through recipients_due,
-- whose status prefix would walk every waiting recipient.
UPDATE recipients NOT INDEXED SET leased_until = :until
WHERE lease_owner = :owner AND id IN (SELECT value FROM json_each(:ids))
  AND status IN ('queued', 'deferred');

-- name: renew_leases
-- The scheduler's one heartbeat for all its long jobs: the rows still ours come back.
UPDATE recipients NOT INDEXED SET leased_until = :until
WHERE lease_owner = :owner AND id IN (SELECT value FROM json_each(:ids))
  AND status IN ('queued', 'deferred')
RETURNING id;

-- name: next_due_unleased
SELECT min(t) FROM (
    SELECT * FROM (
        SELECT r.next_attempt_at AS t FROM recipients r JOIN messages m ON m.id = r.message_id
        WHERE r.status = 'queued' AND m.held = 0
          AND (r.leased_until IS NULL OR r.leased_until <= r.next_attempt_at)
        ORDER BY r.next_attempt_at LIMIT 1)
    UNION ALL
    SELECT * FROM (
        SELECT r.next_attempt_at AS t FROM recipients r JOIN messages m ON m.id = r.message_id
        WHERE r.status = 'deferred' AND m.held = 0
          AND (r.leased_until IS NULL OR r.leased_until <= r.next_attempt_at)
        ORDER BY r.next_attempt_at LIMIT 1)
);

-- name: next_due_leased
SELECT min(r.leased_until) FROM recipients r JOIN messages m ON m.id = r.message_id
WHERE r.leased_until IS NOT NULL AND r.leased_until > r.next_attempt_at
  AND +r.status IN ('queued', 'deferred') AND m.held = 0;  -- + : use recipients_lease

-- name: load_body
-- The body with its digest, and whether any recipient still waits for it (a body already
-- dropped is fine when the work was finished meanwhile, corrupt otherwise).
SELECT body, body_sha256,
       EXISTS (SELECT 1 FROM recipients r
               WHERE r.message_id = messages.id AND r.status IN ('queued', 'deferred'))
FROM messages WHERE id = :id;

-- name: load_headers
SELECT headers FROM messages WHERE id = :id;

-- name: record_recipient
UPDATE recipients SET
    status = :status,
    code = :code,
    reply = :reply,
    attempts = coalesce(:attempts, attempts + 1),
    next_attempt_at = coalesce(:next_attempt_at, next_attempt_at),
    ndr_state = coalesce(:ndr_state, ndr_state),
    warned_at = coalesce(:warned_at, warned_at),
    updated_at = :now,
    lease_owner = NULL,
    leased_until = NULL
WHERE id = :id AND status IN ('queued', 'deferred')
  AND (:owner IS NULL OR lease_owner = :owner);  -- fenced: see the PostgreSQL file

-- name: set_ndr_state
UPDATE recipients SET ndr_state = :ndr_state, updated_at = :now WHERE id = :id;

-- name: mark_ndr_sent
-- With the NDR's own insert, in one transaction: only recipients still pending (an NDR
-- is queued once, whoever builds it).
UPDATE recipients SET ndr_state = 'sent', updated_at = :now
WHERE id IN (SELECT value FROM json_each(:ids)) AND ndr_state = 'pending';

-- name: mark_warned
-- With the delay warning's own insert, in one transaction: once per recipient.
UPDATE recipients NOT INDEXED SET warned_at = :now
WHERE id IN (SELECT value FROM json_each(:ids)) AND warned_at IS NULL
  AND status = 'deferred';

-- name: pending_ndrs
-- Messages whose every recipient is final and that still owe an NDR: what a crash, a
-- storage error or a bug left behind (swept by the running scheduler).
SELECT DISTINCT r.message_id FROM recipients r
WHERE r.ndr_state = 'pending'
  AND NOT EXISTS (SELECT 1 FROM recipients o
                  WHERE o.message_id = r.message_id AND o.status IN ('queued', 'deferred'))
ORDER BY r.message_id LIMIT :limit;

-- name: pending_delay_warnings
-- Messages with a deferred recipient that has waited `ndr.delay_warning` unwarned. Only
-- the recipients still owed a warning are read (recipients_unwarned), oldest first, up to
-- the queue ids of :before (:before_id, the largest id that time can have): younger
-- messages are not looked at.
SELECT DISTINCT r.message_id FROM recipients r INDEXED BY recipients_unwarned
JOIN messages m ON m.id = r.message_id
WHERE r.status = 'deferred' AND r.warned_at IS NULL AND r.message_id <= :before_id
  AND m.received_at <= :before AND m.sender != '' AND m.held = 0
ORDER BY r.message_id LIMIT :limit;

-- name: insert_attempt
-- Through a SELECT, so that the trace of a recipient deleted meanwhile is dropped.
INSERT INTO attempts (message_id, recipient_id, at, mx, ip, dnssec, tlsa, tls, dane, code,
                      reply, policy)
SELECT r.message_id, r.id, :at, :mx, :ip, :dnssec, :tlsa, :tls, :dane, :code, :reply, :policy
FROM recipients r WHERE r.id = :recipient_id AND (:owner IS NULL OR r.lease_owner = :owner);

-- name: finish_messages
-- The body goes when every recipient is final; the trace stays until purge.
UPDATE messages SET body = NULL, finished_at = :now
WHERE id IN (SELECT value FROM json_each(:ids)) AND finished_at IS NULL
  AND NOT EXISTS (SELECT 1 FROM recipients r
                  WHERE r.message_id = messages.id AND r.status IN ('queued', 'deferred'));

-- name: message_exists
SELECT 1 FROM messages WHERE id = :id;

-- name: retry_message
UPDATE recipients SET next_attempt_at = :now, updated_at = :now
WHERE message_id = :id AND status IN ('queued', 'deferred')
  AND (leased_until IS NULL OR leased_until <= :now);

-- name: retry_last_id
SELECT max(id) FROM recipients;

-- name: retry_batch_end
-- `relay queue retry --all` goes through the recipients in batches of :limit ids, one
-- short transaction each (intake waits at most one batch): the last id of the batch
-- after :after, NULL when there is none.
SELECT max(id) FROM (SELECT id FROM recipients WHERE id > :after ORDER BY id LIMIT :limit);

-- name: retry_batch
-- NOT INDEXED: the id range (rowid), never recipients_due (whose status prefix would
-- walk every waiting recipient for each batch: 0.3 s a batch at a million)
UPDATE recipients NOT INDEXED SET next_attempt_at = :now, updated_at = :now
WHERE id > :after AND id <= :upto AND status IN ('queued', 'deferred')
  AND (leased_until IS NULL OR leased_until <= :now);

-- name: delete_message
DELETE FROM messages WHERE id = :id;

-- name: set_held
UPDATE messages SET held = :held, held_reason = :reason WHERE id = :id;

-- name: unlease_message
UPDATE recipients SET lease_owner = NULL, leased_until = NULL
WHERE message_id = :id AND lease_owner = :owner;

-- name: purge
-- At most :limit messages per transaction (the store repeats it while it deletes any).
DELETE FROM messages WHERE id IN (
    SELECT id FROM messages WHERE finished_at IS NOT NULL AND finished_at <= :cutoff
    LIMIT :limit);

-- name: list_page_open
-- `relay queue list` (messages with work left), one page after the queue id :after:
-- walks recipients_open in queue id order (GROUP BY on that order: nothing is sorted or
-- collected) and stops after :limit messages.
SELECT m.id, m.sender, m.received_at, m.size, m.held, m.finished_at, m.held_reason
FROM recipients r INDEXED BY recipients_open
JOIN messages m ON m.id = r.message_id
WHERE r.status IN ('queued', 'deferred') AND r.message_id > :after
  AND (:sender IS NULL OR m.sender = :sender COLLATE NOCASE)
GROUP BY r.message_id
ORDER BY r.message_id LIMIT :limit;

-- name: list_page_all
-- `relay queue list --all`, one page (the primary key's order).
SELECT m.id, m.sender, m.received_at, m.size, m.held, m.finished_at, m.held_reason
FROM messages m
WHERE m.id > :after AND (:sender IS NULL OR m.sender = :sender COLLATE NOCASE)
ORDER BY m.id LIMIT :limit;

-- name: list_page_match
-- With --status/--domain/--code/--recipient: messages with at least one recipient that
-- matches all of them (and, without --all, a recipient still queued or deferred). The
-- filters are read from recipients_list alone, in queue id order; a message row is read
-- only for a recipient that matches.
SELECT m.id, m.sender, m.received_at, m.size, m.held, m.finished_at, m.held_reason
FROM recipients r INDEXED BY recipients_list
JOIN messages m ON m.id = r.message_id
WHERE r.message_id > :after
  AND (:status IS NULL OR r.status = :status)
  AND (:domain IS NULL OR r.domain = :domain)
  AND (:code IS NULL OR r.code = :code)
  AND (:recipient IS NULL OR r.address = :recipient COLLATE NOCASE)
  AND (:include_final OR EXISTS (
          SELECT 1 FROM recipients o INDEXED BY recipients_open
          WHERE o.message_id = m.id AND o.status IN ('queued', 'deferred')))
  AND (:sender IS NULL OR m.sender = :sender COLLATE NOCASE)
GROUP BY r.message_id
ORDER BY r.message_id LIMIT :limit;

-- name: list_recipients
SELECT message_id, address, status, code FROM recipients
WHERE message_id IN (SELECT value FROM json_each(:ids))
ORDER BY message_id, id;

-- name: get_message
SELECT id, sender, received_at, size, held, smtputf8, body_8bit, client_ip, client_helo,
       auth_user, finished_at, body IS NOT NULL AS has_body, extra, requiretls,
       held_reason
FROM messages WHERE id = :id;

-- name: get_recipients
SELECT id, address, domain, status, attempts, next_attempt_at, code, reply, updated_at,
       lease_owner, leased_until, ndr_state, warned_at
FROM recipients WHERE message_id = :id ORDER BY id;

-- name: get_attempts
SELECT recipient_id, at, mx, ip, dnssec, tlsa, tls, dane, code, reply, policy
FROM attempts WHERE message_id = :id ORDER BY at, id;

-- name: stats_by_status
-- The counts kept by the triggers of migration 006 (queue_counts): no scan of the queue.
SELECT key, n FROM queue_counts WHERE kind = 'status' AND n != 0;

-- name: stats_by_code
SELECT key, sub, n FROM queue_counts WHERE kind = 'code' AND n != 0
ORDER BY n DESC, key, sub;

-- name: stats_messages
-- count, held, bytes of the messages with work left, and when the oldest of them (the
-- smallest queue id: ids sort by arrival) was received
SELECT coalesce((SELECT n FROM queue_counts WHERE kind = 'messages' AND key = 'open'), 0),
       coalesce((SELECT n FROM queue_counts WHERE kind = 'messages' AND key = 'held'), 0),
       coalesce((SELECT bytes FROM queue_counts WHERE kind = 'messages' AND key = 'open'), 0),
       (SELECT m.received_at FROM messages m WHERE m.id = (
            SELECT message_id FROM recipients INDEXED BY recipients_open
            WHERE status IN ('queued', 'deferred') ORDER BY message_id LIMIT 1));

-- name: stats_finished
SELECT coalesce((SELECT n FROM queue_counts WHERE kind = 'messages' AND key = 'finished'), 0);

-- name: stats_top_deferred
SELECT key, n FROM queue_counts WHERE kind = 'domain' AND n > 0
ORDER BY n DESC, key LIMIT :limit;

-- name: counts_prune
-- Counts that reached 0 (a code or domain no longer in the queue), removed with the purge.
DELETE FROM queue_counts WHERE kind IN ('code', 'domain') AND n = 0;

-- --- moving mail between queues (relay queue import) ---------------------------------

-- name: export_messages
-- Messages with work left, in id order after :after (a page of :limit).
SELECT m.id, m.sender, m.received_at, m.size, m.body, m.headers, m.smtputf8, m.body_8bit,
       m.client_ip, m.client_helo, m.auth_user, m.extra, m.held, m.requiretls,
       m.body_sha256, m.held_reason
FROM messages m
WHERE m.id > :after AND m.finished_at IS NULL AND m.body IS NOT NULL
ORDER BY m.id LIMIT :limit;

-- name: export_recipients
SELECT message_id, address, domain, status, attempts, next_attempt_at, code, reply,
       updated_at, ndr_state, warned_at
FROM recipients WHERE message_id IN (SELECT value FROM json_each(:ids)) ORDER BY id;

-- name: export_attempts
SELECT a.message_id, r.address, a.at, a.mx, a.ip, a.dnssec, a.tlsa, a.tls, a.dane, a.code,
       a.reply, a.policy
FROM attempts a JOIN recipients r ON r.id = a.recipient_id
WHERE a.message_id IN (SELECT value FROM json_each(:ids)) ORDER BY a.id;

-- name: import_message
INSERT INTO messages (id, sender, received_at, size, body, headers, smtputf8, body_8bit,
                      client_ip, client_helo, auth_user, extra, held, requiretls,
                      body_sha256, held_reason)
VALUES (:id, :sender, :received_at, :size, :body, :headers, :smtputf8, :body_8bit,
        :client_ip, :client_helo, :auth_user, :extra, :held, :requiretls, :body_sha256,
        :held_reason)
ON CONFLICT (id) DO NOTHING
RETURNING id;

-- name: import_recipient
INSERT INTO recipients (message_id, address, domain, status, attempts, next_attempt_at,
                        code, reply, updated_at, ndr_state, warned_at)
VALUES (:message_id, :address, :domain, :status, :attempts, :next_attempt_at, :code,
        :reply, :updated_at, :ndr_state, :warned_at);

-- name: import_attempt
INSERT INTO attempts (message_id, recipient_id, at, mx, ip, dnssec, tlsa, tls, dane, code,
                      reply, policy)
SELECT r.message_id, r.id, :at, :mx, :ip, :dnssec, :tlsa, :tls, :dane, :code, :reply, :policy
FROM recipients r WHERE r.message_id = :message_id AND r.address = :address;

-- name: export_delete
DELETE FROM messages WHERE id IN (SELECT value FROM json_each(:ids));

-- --- cluster: singletons and nodes --------------------------------------------------

-- name: singleton_take
-- Take a named lease when it is free or expired, or renew it when it is ours; a row
-- comes back only when we hold it now.
INSERT INTO singletons (name, owner, leased_until) VALUES (:name, :owner, :now + :ttl)
ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, leased_until = excluded.leased_until
WHERE singletons.owner = excluded.owner OR singletons.leased_until <= :now
RETURNING owner;

-- name: singleton_release
DELETE FROM singletons WHERE name = :name AND owner = :owner;

-- name: singleton_list
SELECT name, owner, leased_until FROM singletons ORDER BY name;

-- name: node_seen
INSERT INTO nodes (owner, node, started_at, seen_at) VALUES (:owner, :node, :started_at, :now)
ON CONFLICT (owner) DO UPDATE SET seen_at = excluded.seen_at;

-- name: node_list
SELECT owner, node, started_at, seen_at, :now FROM nodes ORDER BY node, started_at;

-- name: node_forget
DELETE FROM nodes WHERE seen_at < :before;

-- --- TLS reporting (RFC 8460) -------------------------------------------------------

-- name: tlsrpt_open_period
-- The period a result recorded now belongs to (a late one goes into the newest).
SELECT id FROM tlsrpt_periods WHERE closed_at IS NULL AND end_at > :now
ORDER BY end_at DESC LIMIT 1;

-- name: tlsrpt_last_end
SELECT max(end_at) FROM tlsrpt_periods;

-- name: tlsrpt_insert_period
INSERT OR IGNORE INTO tlsrpt_periods (begin_at, end_at) VALUES (:begin, :end);

-- name: tlsrpt_period_at
SELECT id FROM tlsrpt_periods WHERE begin_at = :begin ORDER BY id DESC LIMIT 1;

-- name: tlsrpt_add_result
INSERT INTO tlsrpt_results (period_id, policy_domain, policy_type, policy_strings, mx_host,
                            result_type, sending_ip, receiving_ip, detail, count)
VALUES (:period_id, :policy_domain, :policy_type, :policy_strings, :mx_host, :result_type,
        :sending_ip, :receiving_ip, :detail, :count)
ON CONFLICT (period_id, policy_domain, policy_type, policy_strings, mx_host, result_type,
             sending_ip, receiving_ip)
DO UPDATE SET count = count + excluded.count;

-- name: tlsrpt_periods_to_close
-- Open periods that have ended by :now, or (:cut = 1) every open period that has begun.
SELECT id, begin_at, end_at FROM tlsrpt_periods
WHERE closed_at IS NULL AND (end_at <= :now OR (:cut = 1 AND begin_at <= :now))
ORDER BY begin_at;

-- name: tlsrpt_period_domains
SELECT DISTINCT policy_domain FROM tlsrpt_results WHERE period_id = :id ORDER BY 1;

-- name: tlsrpt_close_period
UPDATE tlsrpt_periods SET closed_at = :now, end_at = :end_at
WHERE id = :id AND closed_at IS NULL;

-- name: tlsrpt_insert_report
INSERT OR IGNORE INTO tlsrpt_reports (period_id, policy_domain, begin_at, end_at, due_at,
                                      next_attempt_at, updated_at)
VALUES (:period_id, :policy_domain, :begin_at, :end_at, :due_at, :due_at, :now);

-- name: tlsrpt_claim_reports
UPDATE tlsrpt_reports SET lease_owner = :owner, leased_until = :until
WHERE id IN (
    SELECT id FROM tlsrpt_reports
    WHERE state = 'pending' AND next_attempt_at <= :now
      AND (leased_until IS NULL OR leased_until <= :now)
      AND (:period_id IS NULL OR period_id = :period_id)
    ORDER BY next_attempt_at, id LIMIT :limit)
RETURNING id, period_id, policy_domain, begin_at, end_at, due_at, attempts;

-- name: tlsrpt_report_results
SELECT policy_domain, policy_type, policy_strings, mx_host, result_type, sending_ip,
       receiving_ip, detail, count
FROM tlsrpt_results WHERE period_id = :period_id AND policy_domain = :policy_domain;

-- name: tlsrpt_report_sends
SELECT uri, state, detail FROM tlsrpt_sends WHERE report_id = :id ORDER BY uri;

-- name: tlsrpt_set_send
INSERT INTO tlsrpt_sends (report_id, uri, state, detail, at)
VALUES (:report_id, :uri, :state, :detail, :at)
ON CONFLICT (report_id, uri) DO UPDATE SET state = excluded.state, detail = excluded.detail,
                                         at = excluded.at;

-- name: tlsrpt_update_report
UPDATE tlsrpt_reports SET state = :state, attempts = :attempts,
       next_attempt_at = :next_attempt_at, report_id = :report_id, detail = :detail,
       lease_owner = NULL, leased_until = NULL, updated_at = :now
WHERE id = :id;

-- name: tlsrpt_next_report
SELECT min(next_attempt_at) FROM tlsrpt_reports WHERE state = 'pending';

-- name: tlsrpt_next_period_end
SELECT min(end_at) FROM tlsrpt_periods WHERE closed_at IS NULL;

-- name: tlsrpt_open_results
SELECT p.id, p.begin_at, p.end_at, r.policy_domain, r.policy_type, r.policy_strings,
       r.mx_host, r.result_type, r.sending_ip, r.receiving_ip, r.detail, r.count
FROM tlsrpt_periods p JOIN tlsrpt_results r ON r.period_id = p.id
WHERE p.closed_at IS NULL ORDER BY p.begin_at, r.policy_domain;

-- name: tlsrpt_open_periods
SELECT id, begin_at, end_at FROM tlsrpt_periods WHERE closed_at IS NULL ORDER BY begin_at;

-- name: tlsrpt_list_reports
SELECT r.id, r.policy_domain, r.begin_at, r.end_at, r.due_at, r.next_attempt_at, r.state,
       r.attempts, r.report_id, r.detail,
       (SELECT json_group_array(json_object('uri', s.uri, 'state', s.state,
                                            'detail', s.detail))
        FROM tlsrpt_sends s WHERE s.report_id = r.id)
FROM tlsrpt_reports r ORDER BY r.id DESC LIMIT :limit;

-- name: tlsrpt_purge
-- Closed periods (with their results, reports and sends) whose reports are all done.
DELETE FROM tlsrpt_periods
WHERE closed_at IS NOT NULL AND closed_at < :before
  AND NOT EXISTS (SELECT 1 FROM tlsrpt_reports r
                  WHERE r.period_id = tlsrpt_periods.id AND r.state = 'pending');

-- --- MTA-STS policy cache (RFC 8461) -----------------------------------------------

-- name: sts_get
SELECT domain, policy_id, policy, fetched_at, expires_at, checked_at, failed_at, failed_id,
       failure, failure_type
FROM sts_policies WHERE domain = :domain;

-- name: sts_put
INSERT INTO sts_policies (domain, policy_id, policy, mode, max_age, fetched_at, expires_at,
                          checked_at)
VALUES (:domain, :policy_id, :policy, :mode, :max_age, :now, :expires_at, :now)
ON CONFLICT (domain) DO UPDATE SET
    policy_id = excluded.policy_id, policy = excluded.policy, mode = excluded.mode,
    max_age = excluded.max_age, fetched_at = excluded.fetched_at,
    expires_at = excluded.expires_at, checked_at = excluded.checked_at,
    failed_at = NULL, failed_id = '', failure = '', failure_type = '';

-- name: sts_fail
-- A failed fetch: the cached policy (if any) stays as it is (RFC 8461 §5.1).
INSERT INTO sts_policies (domain, checked_at, failed_at, failed_id, failure, failure_type)
VALUES (:domain, :now, :now, :policy_id, :failure, :failure_type)
ON CONFLICT (domain) DO UPDATE SET
    checked_at = excluded.checked_at, failed_at = excluded.failed_at,
    failed_id = excluded.failed_id, failure = excluded.failure,
    failure_type = excluded.failure_type;

-- name: sts_checked
UPDATE sts_policies SET checked_at = :now WHERE domain = :domain;

-- name: sts_due
-- Cached policies to look at again in the background: not checked since
-- :checked_before, or within min(:refresh_before, max_age / 4) of their expiry (a policy
-- already expired is left to the next delivery, which fetches it anyway).
SELECT domain FROM sts_policies
WHERE policy != '' AND expires_at > :now
  AND (checked_at IS NULL OR checked_at <= :checked_before
       OR expires_at - :now < min(:refresh_before, max_age / 4.0))
ORDER BY checked_at LIMIT :limit;

-- name: sts_list
SELECT domain, policy_id, policy, fetched_at, expires_at, checked_at, failed_at, failed_id,
       failure, failure_type
FROM sts_policies ORDER BY domain;

-- name: sts_delete
DELETE FROM sts_policies WHERE domain = :domain;
