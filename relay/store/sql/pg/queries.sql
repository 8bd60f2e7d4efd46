-- Named queries of the PostgreSQL store: the same names, parameters and result columns
-- as relay/store/sql/sqlite/queries.sql (the store's code is shared; a test compares
-- the two). Parameters are written :name and bound in order ($1, $2, …) by
-- relay.store.pg.conn; the intake path uses positional $n. A parameter only compared
-- with IS NULL carries a cast. Leases are taken, renewed and judged expired by the
-- database's clock (extract(epoch FROM clock_timestamp())), never a node's: nodes whose
-- clocks disagree never take work whose lease still runs. Due times come from the
-- retry plan of the node that recorded them and are compared with the claiming node's
-- :now (a node whose clock is fast retries a little early, nothing worse).

-- name: insert_message
INSERT INTO messages (id, sender, received_at, size, headers, smtputf8, body_8bit,
                      client_ip, client_helo, auth_user, extra, requiretls, body_sha256)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13);

-- name: insert_body
INSERT INTO bodies (message_id, body) VALUES ($1, $2);

-- name: insert_recipient
INSERT INTO recipients (message_id, address, domain, next_attempt_at, updated_at)
VALUES ($1, $2, $3, $4, $5);

-- name: claim
-- As in SQLite: whole (message, domain) groups, never-tried and deferred mail in turn,
-- within the per-domain limits of :caps, dead domains' work apart (see the SQLite
-- file). The limits are this node's own: each node keeps its own per-destination
-- state. The :window oldest due rows are looked at without locks; the rows taken are
-- locked with SKIP LOCKED, so nodes claiming at the same moment take different work;
-- a group whose other rows another node holds is split.
WITH clock AS (SELECT extract(epoch FROM clock_timestamp()) AS now),
caps AS (
    SELECT key AS domain, value::integer AS free FROM jsonb_each_text(:caps::jsonb)
), fresh AS (
    SELECT s.message_id, s.domain, min(s.next_attempt_at) AS due FROM (
        SELECT r.id, r.message_id, r.domain, r.next_attempt_at
        FROM (
            SELECT id, domain FROM recipients
            WHERE status = 'queued' AND next_attempt_at <= :now
            ORDER BY next_attempt_at, id LIMIT :window
        ) AS w JOIN recipients r ON r.id = w.id JOIN messages m ON m.id = r.message_id,
        clock c
        WHERE w.domain NOT IN (SELECT domain FROM caps WHERE free <= 0) AND m.held = 0
          AND r.status = 'queued' AND r.next_attempt_at <= :now
          AND (r.leased_until IS NULL OR r.leased_until <= c.now)
        LIMIT :scan
        FOR UPDATE OF r SKIP LOCKED
    ) AS s GROUP BY s.message_id, s.domain
), retry AS (
    SELECT s.message_id, s.domain, min(s.next_attempt_at) AS due FROM (
        SELECT r.id, r.message_id, r.domain, r.next_attempt_at
        FROM (
            SELECT id, domain FROM recipients
            WHERE status = 'deferred' AND next_attempt_at <= :now
            ORDER BY next_attempt_at, id LIMIT :window
        ) AS w JOIN recipients r ON r.id = w.id JOIN messages m ON m.id = r.message_id,
        clock c
        WHERE w.domain NOT IN (SELECT domain FROM caps WHERE free <= 0) AND m.held = 0
          AND r.status = 'deferred' AND r.next_attempt_at <= :now
          AND (r.leased_until IS NULL OR r.leased_until <= c.now)
        LIMIT :scan
        FOR UPDATE OF r SKIP LOCKED
    ) AS s GROUP BY s.message_id, s.domain
), dead AS (
    SELECT s.message_id, s.domain, min(s.next_attempt_at) AS due FROM (
        SELECT r.id, r.message_id, r.domain, r.next_attempt_at
        FROM caps d JOIN recipients r ON r.domain = d.domain
             JOIN messages m ON m.id = r.message_id, clock c
        WHERE d.free < 0 AND r.status IN ('queued', 'deferred')
          AND r.next_attempt_at <= :now AND m.held = 0
          AND (r.leased_until IS NULL OR r.leased_until <= c.now)
        LIMIT :dead_scan
        FOR UPDATE OF r SKIP LOCKED
    ) AS s GROUP BY s.message_id, s.domain
), groups AS (
    SELECT message_id, domain, row_number() OVER (ORDER BY due, message_id) AS rn, 0 AS k
    FROM fresh
    UNION ALL
    SELECT message_id, domain, row_number() OVER (ORDER BY due, message_id) AS rn, 1 AS k
    FROM retry
), capped AS (
    SELECT g.message_id, g.domain, g.rn, g.k, coalesce(c.free, :initial::integer) AS free,
           row_number() OVER (PARTITION BY g.domain ORDER BY g.rn, g.k) AS dn
    FROM groups g LEFT JOIN caps c ON c.domain = g.domain
), ranked AS (
    SELECT message_id, domain, k, row_number() OVER (PARTITION BY k ORDER BY rn) AS kn
    FROM capped WHERE dn <= free
), picked AS (
    (SELECT message_id, domain FROM ranked
     WHERE kn <= CASE k WHEN 0 THEN :limit::bigint ELSE :retry_limit::bigint END
     ORDER BY kn, k LIMIT :limit)
    UNION ALL
    (SELECT message_id, domain FROM dead ORDER BY due, message_id LIMIT :dead_limit)
), rows AS (
    SELECT r.id FROM picked p JOIN recipients r
      ON r.message_id = p.message_id AND r.domain = p.domain, clock c
    WHERE r.status IN ('queued', 'deferred') AND r.next_attempt_at <= :now
      AND (r.leased_until IS NULL OR r.leased_until <= c.now)
    FOR UPDATE OF r SKIP LOCKED
)
UPDATE recipients SET taken_from = lease_owner, lease_owner = :owner,
                      leased_until = (SELECT now FROM clock) + :lease
WHERE id IN (SELECT id FROM rows)
RETURNING id, message_id, domain, address, attempts, status, next_attempt_at,
          taken_from;

-- name: job_messages
-- The messages of claimed work; the body (with its digest) comes along when the
-- message is no larger than :inline octets.
SELECT m.id, m.sender, m.received_at, m.smtputf8, m.size,
       coalesce(m.extra::jsonb ->> 'kind', ''), m.requiretls,
       CASE WHEN m.size <= :inline::bigint THEN b.body END,
       CASE WHEN m.size <= :inline::bigint THEN m.body_sha256 END
FROM messages m LEFT JOIN bodies b ON b.message_id = m.id
WHERE m.id IN (SELECT jsonb_array_elements_text(:ids::jsonb));

-- name: unlease
UPDATE recipients SET lease_owner = NULL, leased_until = NULL
WHERE lease_owner = :owner
  AND (:ids::text IS NULL
       OR id IN (SELECT jsonb_array_elements_text(:ids::jsonb)::bigint));

-- name: renew_lease
UPDATE recipients SET leased_until = extract(epoch FROM clock_timestamp()) + :lease
WHERE lease_owner = :owner
  AND id IN (SELECT jsonb_array_elements_text(:ids::jsonb)::bigint)
  AND status IN ('queued', 'deferred');

-- name: renew_leases
UPDATE recipients SET leased_until = extract(epoch FROM clock_timestamp()) + :lease
WHERE lease_owner = :owner
  AND id IN (SELECT jsonb_array_elements_text(:ids::jsonb)::bigint)
  AND status IN ('queued', 'deferred')
RETURNING id;

-- name: next_due_unleased
SELECT min(t) FROM (
    (SELECT r.next_attempt_at AS t FROM recipients r JOIN messages m ON m.id = r.message_id
     WHERE r.status = 'queued' AND m.held = 0
       AND (r.leased_until IS NULL OR r.leased_until <= r.next_attempt_at)
     ORDER BY r.next_attempt_at LIMIT 1)
    UNION ALL
    (SELECT r.next_attempt_at AS t FROM recipients r JOIN messages m ON m.id = r.message_id
     WHERE r.status = 'deferred' AND m.held = 0
       AND (r.leased_until IS NULL OR r.leased_until <= r.next_attempt_at)
     ORDER BY r.next_attempt_at LIMIT 1)
) AS u;

-- name: next_due_leased
SELECT min(r.leased_until) FROM recipients r JOIN messages m ON m.id = r.message_id
WHERE r.leased_until IS NOT NULL AND r.leased_until > r.next_attempt_at
  AND r.status IN ('queued', 'deferred') AND m.held = 0;

-- name: load_body
-- The body with its digest, and whether any recipient still waits for it.
SELECT b.body, m.body_sha256,
       EXISTS (SELECT 1 FROM recipients r
               WHERE r.message_id = m.id AND r.status IN ('queued', 'deferred'))
FROM messages m LEFT JOIN bodies b ON b.message_id = m.id WHERE m.id = :id;

-- name: mark_ndr_sent
UPDATE recipients SET ndr_state = 'sent', updated_at = :now
WHERE id IN (SELECT jsonb_array_elements_text(:ids::jsonb)::bigint)
  AND ndr_state = 'pending';

-- name: mark_warned
UPDATE recipients SET warned_at = :now
WHERE id IN (SELECT jsonb_array_elements_text(:ids::jsonb)::bigint) AND warned_at IS NULL
  AND status = 'deferred';

-- name: pending_ndrs
SELECT DISTINCT r.message_id FROM recipients r
WHERE r.ndr_state = 'pending'
  AND NOT EXISTS (SELECT 1 FROM recipients o
                  WHERE o.message_id = r.message_id AND o.status IN ('queued', 'deferred'))
ORDER BY r.message_id LIMIT :limit;

-- name: pending_delay_warnings
-- Only the recipients still owed a warning (recipients_unwarned), oldest first, up to the
-- queue ids of :before (:before_id): see the SQLite file.
SELECT DISTINCT r.message_id FROM recipients r JOIN messages m ON m.id = r.message_id
WHERE r.status = 'deferred' AND r.warned_at IS NULL AND r.message_id <= :before_id
  AND m.received_at <= :before AND m.sender != '' AND m.held = 0
ORDER BY r.message_id LIMIT :limit;

-- name: load_headers
SELECT headers FROM messages WHERE id = :id;

-- name: record_recipient
-- Fenced: with an :owner, only a recipient still leased to it changes (a node whose
-- lease ran out and was taken over records nothing).
UPDATE recipients SET
    status = :status,
    code = :code,
    reply = :reply,
    attempts = coalesce(:attempts::integer, attempts + 1),
    next_attempt_at = coalesce(:next_attempt_at::double precision, next_attempt_at),
    ndr_state = coalesce(:ndr_state::text, ndr_state),
    warned_at = coalesce(:warned_at::double precision, warned_at),
    updated_at = :now,
    lease_owner = NULL,
    leased_until = NULL
WHERE id = :id AND status IN ('queued', 'deferred')
  AND (:owner::text IS NULL OR lease_owner = :owner);

-- name: set_ndr_state
UPDATE recipients SET ndr_state = :ndr_state, updated_at = :now WHERE id = :id;

-- name: insert_attempt
INSERT INTO attempts (message_id, recipient_id, at, mx, ip, dnssec, tlsa, tls, dane, code,
                      reply, policy)
SELECT r.message_id, r.id, :at, :mx, :ip, :dnssec, :tlsa, :tls, :dane, :code, :reply, :policy
FROM recipients r WHERE r.id = :recipient_id
  AND (:owner::text IS NULL OR r.lease_owner = :owner);

-- name: finish_messages
WITH done AS (
    UPDATE messages SET finished_at = :now
    WHERE id IN (SELECT jsonb_array_elements_text(:ids::jsonb)) AND finished_at IS NULL
      AND NOT EXISTS (SELECT 1 FROM recipients r
                      WHERE r.message_id = messages.id
                        AND r.status IN ('queued', 'deferred'))
    RETURNING id
)
DELETE FROM bodies WHERE message_id IN (SELECT id FROM done);

-- name: message_exists
SELECT 1 FROM messages WHERE id = :id;

-- name: retry_message
UPDATE recipients SET next_attempt_at = :now, updated_at = :now
WHERE message_id = :id AND status IN ('queued', 'deferred')
  AND (leased_until IS NULL OR leased_until <= extract(epoch FROM clock_timestamp()));

-- name: retry_last_id
SELECT max(id) FROM recipients;

-- name: retry_batch_end
-- `relay queue retry --all` in batches of :limit ids, one short transaction each.
SELECT max(id) FROM (SELECT id FROM recipients WHERE id > :after ORDER BY id LIMIT :limit) t;

-- name: retry_batch
UPDATE recipients SET next_attempt_at = :now, updated_at = :now
WHERE id > :after AND id <= :upto AND status IN ('queued', 'deferred')
  AND (leased_until IS NULL OR leased_until <= extract(epoch FROM clock_timestamp()));

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
-- `relay queue list`, one page after :after: recipients_open in queue id order.
SELECT m.id, m.sender, m.received_at, m.size, m.held, m.finished_at, m.held_reason
FROM (SELECT DISTINCT message_id FROM recipients
      WHERE status IN ('queued', 'deferred') AND message_id > :after
      ORDER BY message_id) AS o
JOIN messages m ON m.id = o.message_id
WHERE (:sender::text IS NULL OR lower(m.sender) = lower(:sender))
ORDER BY o.message_id LIMIT :limit;

-- name: list_page_all
SELECT m.id, m.sender, m.received_at, m.size, m.held, m.finished_at, m.held_reason
FROM messages m
WHERE m.id > :after AND (:sender::text IS NULL OR lower(m.sender) = lower(:sender))
ORDER BY m.id LIMIT :limit;

-- name: list_page_match
-- With recipient filters: read from recipients_list (index-only), in queue id order.
SELECT m.id, m.sender, m.received_at, m.size, m.held, m.finished_at, m.held_reason
FROM (SELECT DISTINCT message_id FROM recipients
      WHERE message_id > :after
        AND (:status::text IS NULL OR status = :status)
        AND (:domain::text IS NULL OR domain = :domain)
        AND (:code::text IS NULL OR code = :code)
        AND (:recipient::text IS NULL OR lower(address) = lower(:recipient))
      ORDER BY message_id) AS f
JOIN messages m ON m.id = f.message_id
WHERE (:include_final::integer = 1 OR EXISTS (
          SELECT 1 FROM recipients o
          WHERE o.message_id = m.id AND o.status IN ('queued', 'deferred')))
  AND (:sender::text IS NULL OR lower(m.sender) = lower(:sender))
ORDER BY f.message_id LIMIT :limit;

-- name: list_recipients
SELECT message_id, address, status, code FROM recipients
WHERE message_id IN (SELECT jsonb_array_elements_text(:ids::jsonb))
ORDER BY message_id, id;

-- name: get_message
SELECT m.id, m.sender, m.received_at, m.size, m.held, m.smtputf8, m.body_8bit, m.client_ip,
       m.client_helo, m.auth_user, m.finished_at,
       EXISTS (SELECT 1 FROM bodies b WHERE b.message_id = m.id) AS has_body, m.extra,
       m.requiretls, m.held_reason
FROM messages m WHERE m.id = :id;

-- name: get_recipients
SELECT id, address, domain, status, attempts, next_attempt_at, code, reply, updated_at,
       lease_owner, leased_until, ndr_state, warned_at
FROM recipients WHERE message_id = :id ORDER BY id;

-- name: get_attempts
SELECT recipient_id, at, mx, ip, dnssec, tlsa, tls, dane, code, reply, policy
FROM attempts WHERE message_id = :id ORDER BY at, id;

-- name: stats_by_status
SELECT status, count(*) FROM recipients GROUP BY status;

-- name: stats_by_code
SELECT code, status, count(*) AS n FROM recipients WHERE code != ''
GROUP BY code, status ORDER BY n DESC, code, status;

-- name: stats_messages
-- Aggregates here (a counter row shared by every node would serialize their writes):
-- the messages with work left (finished_at IS NULL, as SQLite's counts), and the oldest
-- of them (the smallest queue id still queued or deferred).
SELECT count(*), count(*) FILTER (WHERE m.held != 0), coalesce(sum(m.size), 0)::bigint,
       (SELECT o.received_at FROM messages o WHERE o.id = (
            SELECT min(message_id) FROM recipients
            WHERE status IN ('queued', 'deferred')))
FROM messages m WHERE m.finished_at IS NULL;

-- name: stats_finished
SELECT count(*) FROM messages WHERE finished_at IS NOT NULL;

-- name: stats_top_deferred
SELECT domain, count(*) AS n FROM recipients WHERE status = 'deferred'
GROUP BY domain ORDER BY n DESC, domain LIMIT :limit;

-- name: counts_prune
-- SQLite keeps counts in a table; PostgreSQL counts when asked: nothing to prune.
SELECT 1 WHERE false;

-- --- moving mail between queues (relay queue import) ---------------------------------

-- name: export_messages
SELECT m.id, m.sender, m.received_at, m.size, b.body, m.headers, m.smtputf8, m.body_8bit,
       m.client_ip, m.client_helo, m.auth_user, m.extra, m.held, m.requiretls,
       m.body_sha256, m.held_reason
FROM messages m JOIN bodies b ON b.message_id = m.id
WHERE m.id > :after AND m.finished_at IS NULL
ORDER BY m.id LIMIT :limit;

-- name: export_recipients
SELECT message_id, address, domain, status, attempts, next_attempt_at, code, reply,
       updated_at, ndr_state, warned_at
FROM recipients WHERE message_id IN (SELECT jsonb_array_elements_text(:ids::jsonb))
ORDER BY id;

-- name: export_attempts
SELECT a.message_id, r.address, a.at, a.mx, a.ip, a.dnssec, a.tlsa, a.tls, a.dane, a.code,
       a.reply, a.policy
FROM attempts a JOIN recipients r ON r.id = a.recipient_id
WHERE a.message_id IN (SELECT jsonb_array_elements_text(:ids::jsonb)) ORDER BY a.id;

-- name: import_message
-- The message and its body; a row comes back only when the message was new.
WITH m AS (
    INSERT INTO messages (id, sender, received_at, size, headers, smtputf8, body_8bit,
                          client_ip, client_helo, auth_user, extra, held, requiretls,
                          body_sha256, held_reason)
    VALUES (:id, :sender, :received_at, :size, :headers, :smtputf8, :body_8bit,
            :client_ip, :client_helo, :auth_user, :extra, :held, :requiretls,
            :body_sha256, :held_reason)
    ON CONFLICT (id) DO NOTHING
    RETURNING id
)
INSERT INTO bodies (message_id, body) SELECT id, :body FROM m RETURNING message_id;

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
DELETE FROM messages WHERE id IN (SELECT jsonb_array_elements_text(:ids::jsonb));

-- --- cluster: singletons and nodes --------------------------------------------------

-- name: singleton_take
-- Take a named lease when it is free or expired, or renew it when it is ours; a row
-- comes back only when we hold it now.
INSERT INTO singletons (name, owner, leased_until)
VALUES (:name, :owner, extract(epoch FROM clock_timestamp()) + :ttl)
ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, leased_until = excluded.leased_until
WHERE singletons.owner = excluded.owner
   OR singletons.leased_until <= extract(epoch FROM clock_timestamp())
RETURNING owner;

-- name: singleton_release
DELETE FROM singletons WHERE name = :name AND owner = :owner;

-- name: singleton_list
SELECT name, owner, leased_until FROM singletons ORDER BY name;

-- name: node_seen
INSERT INTO nodes (owner, node, started_at, seen_at)
VALUES (:owner, :node, :started_at, extract(epoch FROM clock_timestamp()))
ON CONFLICT (owner) DO UPDATE SET seen_at = excluded.seen_at;

-- name: node_list
SELECT owner, node, started_at, seen_at, extract(epoch FROM clock_timestamp())::double precision
FROM nodes ORDER BY node, started_at;

-- name: node_forget
DELETE FROM nodes WHERE seen_at < :before;

-- --- TLS reporting (RFC 8460) -------------------------------------------------------

-- name: tlsrpt_open_period
SELECT id FROM tlsrpt_periods WHERE closed_at IS NULL AND end_at > :now
ORDER BY end_at DESC LIMIT 1;

-- name: tlsrpt_last_end
SELECT max(end_at) FROM tlsrpt_periods;

-- name: tlsrpt_insert_period
INSERT INTO tlsrpt_periods (begin_at, end_at) VALUES (:begin, :end)
ON CONFLICT (begin_at) DO NOTHING;

-- name: tlsrpt_period_at
SELECT id FROM tlsrpt_periods WHERE begin_at = :begin ORDER BY id DESC LIMIT 1;

-- name: tlsrpt_add_result
INSERT INTO tlsrpt_results (period_id, policy_domain, policy_type, policy_strings, mx_host,
                            result_type, sending_ip, receiving_ip, detail, count)
VALUES (:period_id, :policy_domain, :policy_type, :policy_strings, :mx_host, :result_type,
        :sending_ip, :receiving_ip, :detail, :count)
ON CONFLICT (period_id, policy_domain, policy_type, policy_strings, mx_host, result_type,
             sending_ip, receiving_ip)
DO UPDATE SET count = tlsrpt_results.count + excluded.count;

-- name: tlsrpt_periods_to_close
SELECT id, begin_at, end_at FROM tlsrpt_periods
WHERE closed_at IS NULL AND (end_at <= :now OR (:cut::integer = 1 AND begin_at <= :now))
ORDER BY begin_at;

-- name: tlsrpt_period_domains
SELECT DISTINCT policy_domain FROM tlsrpt_results WHERE period_id = :id ORDER BY 1;

-- name: tlsrpt_close_period
UPDATE tlsrpt_periods SET closed_at = :now, end_at = :end_at
WHERE id = :id AND closed_at IS NULL;

-- name: tlsrpt_insert_report
INSERT INTO tlsrpt_reports (period_id, policy_domain, begin_at, end_at, due_at,
                            next_attempt_at, updated_at)
VALUES (:period_id, :policy_domain, :begin_at, :end_at, :due_at, :due_at, :now)
ON CONFLICT (period_id, policy_domain) DO NOTHING;

-- name: tlsrpt_claim_reports
UPDATE tlsrpt_reports SET lease_owner = :owner,
                          leased_until = extract(epoch FROM clock_timestamp()) + :lease
WHERE id IN (
    SELECT id FROM tlsrpt_reports
    WHERE state = 'pending' AND next_attempt_at <= :now
      AND (leased_until IS NULL OR leased_until <= extract(epoch FROM clock_timestamp()))
      AND (:period_id::bigint IS NULL OR period_id = :period_id)
    ORDER BY next_attempt_at, id LIMIT :limit
    FOR UPDATE SKIP LOCKED)
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
       (SELECT coalesce(json_agg(json_build_object('uri', s.uri, 'state', s.state,
                                                   'detail', s.detail) ORDER BY s.uri),
                        '[]'::json)::text
        FROM tlsrpt_sends s WHERE s.report_id = r.id)
FROM tlsrpt_reports r ORDER BY r.id DESC LIMIT :limit;

-- name: tlsrpt_purge
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
INSERT INTO sts_policies (domain, checked_at, failed_at, failed_id, failure, failure_type)
VALUES (:domain, :now, :now, :policy_id, :failure, :failure_type)
ON CONFLICT (domain) DO UPDATE SET
    checked_at = excluded.checked_at, failed_at = excluded.failed_at,
    failed_id = excluded.failed_id, failure = excluded.failure,
    failure_type = excluded.failure_type;

-- name: sts_checked
UPDATE sts_policies SET checked_at = :now WHERE domain = :domain;

-- name: sts_due
SELECT domain FROM sts_policies
WHERE policy != '' AND expires_at > :now
  AND (checked_at IS NULL OR checked_at <= :checked_before
       OR expires_at - :now < least(:refresh_before, max_age / 4.0))
ORDER BY checked_at NULLS FIRST LIMIT :limit;

-- name: sts_list
SELECT domain, policy_id, policy, fetched_at, expires_at, checked_at, failed_at, failed_id,
       failure, failure_type
FROM sts_policies ORDER BY domain;

-- name: sts_delete
DELETE FROM sts_policies WHERE domain = :domain;
