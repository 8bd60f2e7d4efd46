-- dane-relay queue schema on PostgreSQL, version 3: indexes for claims that respect
-- per-destination limits (issue 14, relay.delivery.destinations); see
-- relay/store/sql/sqlite/007_claim_indexes.sql.
-- recipients_due gains the domain: a claim skips the rows of destinations at their
-- limit on the index entry alone. recipients_domain gains next_attempt_at: the due work
-- of a dead destination is found by a range scan of its own rows.
DROP INDEX recipients_due;
CREATE INDEX recipients_due ON recipients (status, next_attempt_at, id) INCLUDE (domain)
    WHERE status IN ('queued', 'deferred');
DROP INDEX recipients_domain;
CREATE INDEX recipients_domain ON recipients (domain, status, next_attempt_at);
