-- dane-relay queue schema on PostgreSQL, version 2: a deep queue costs nothing to look at
-- (issue 14); see relay/store/sql/sqlite/006_depth.sql. Built once, by the first node
-- that starts with this version (writes to recipients wait meanwhile: ~2 s at 1 M).

-- `relay queue list` pages through the messages with work left in queue id order, and
-- `queue stats` finds the oldest of them, without touching finished mail.
CREATE INDEX recipients_open ON recipients (message_id)
    WHERE status IN ('queued', 'deferred');

-- `relay queue list --status/--domain/--code/--recipient`: the filters are evaluated on
-- this index (index-only scans), in queue id order.
CREATE INDEX recipients_list ON recipients (message_id, status, domain, code, address);

-- The delay-warning sweep reads only the recipients still owed a warning.
CREATE INDEX recipients_unwarned ON recipients (message_id)
    WHERE status = 'deferred' AND warned_at IS NULL;
