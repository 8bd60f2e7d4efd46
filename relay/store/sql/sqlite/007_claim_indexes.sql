-- dane-relay schema version 7: indexes for claims that respect per-destination limits
-- (issue 14, relay.delivery.destinations).
-- recipients_due gains the domain: a claim walks the oldest due rows and skips those of
-- destinations at their limit on the index entry alone (no table row read for them).
-- recipients_domain gains next_attempt_at: the due work of a dead destination is found
-- by a range scan of its own rows, however much of its mail waits for later.
DROP INDEX recipients_due;
CREATE INDEX recipients_due ON recipients (status, next_attempt_at, id, domain);
DROP INDEX recipients_domain;
CREATE INDEX recipients_domain ON recipients (domain, status, next_attempt_at);
