-- dane-relay schema version 6: a deep queue costs nothing to look at (issue 14).
--
-- Applied once, at the first start after an upgrade: it reads the queue once to build
-- two indexes and the counts (about 5 s at 1 M queued messages with a warm page cache;
-- the first start after a reboot reads the file from disk). Every later start is as
-- fast as with an empty queue.

-- `relay queue list` (without --all) pages through the messages with work left in queue
-- id order, and `queue stats` finds the oldest of them, without touching finished mail.
CREATE INDEX recipients_open ON recipients (message_id)
    WHERE status IN ('queued', 'deferred');

-- `relay queue list --status/--domain/--code/--recipient`: the filters are evaluated on
-- this index alone, in queue id order (no table row is read for a recipient that does
-- not match).
CREATE INDEX recipients_list ON recipients (message_id, status, domain, code, address);

-- The sweep for delay warnings (ndr.delay_warning) reads only the recipients still owed
-- one, oldest first, instead of every deferred recipient.
CREATE INDEX recipients_unwarned ON recipients (message_id)
    WHERE status = 'deferred' AND warned_at IS NULL;

-- `relay queue stats` and the queue gauges of /metrics read these counts instead of
-- counting the queue. They are kept by the triggers below, in the same transaction as
-- the change they count, whatever statement makes it (intake, outcomes, deletes and the
-- cascades of deletes, imports, the CLI). Rows:
--   ('status', <status>, '')          recipients per status
--   ('code', <code>, <status>)        recipients per last code and status (code != '')
--   ('domain', <domain>, '')          deferred recipients per destination domain
--   ('messages', 'open', '')          messages with work left (finished_at IS NULL), bytes
--   ('messages', 'held', '')          of those, held ones, bytes
--   ('messages', 'finished', '')      finished messages kept for their trace, bytes
-- A count that reaches 0 stays as a row until the purge removes it.
CREATE TABLE queue_counts (
    kind   TEXT NOT NULL,
    key    TEXT NOT NULL,
    sub    TEXT NOT NULL DEFAULT '',
    n      INTEGER NOT NULL DEFAULT 0,
    bytes  INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (kind, key, sub)
) WITHOUT ROWID;

INSERT INTO queue_counts (kind, key, sub, n)
SELECT 'status', status, '', count(*) FROM recipients GROUP BY status;

INSERT INTO queue_counts (kind, key, sub, n)
SELECT 'code', code, status, count(*) FROM recipients WHERE code != '' GROUP BY code, status;

INSERT INTO queue_counts (kind, key, sub, n)
SELECT 'domain', domain, '', count(*) FROM recipients WHERE status = 'deferred'
GROUP BY domain;

WITH t AS MATERIALIZED (
    SELECT coalesce(sum(finished_at IS NULL), 0) AS open_n,
           coalesce(sum(CASE WHEN finished_at IS NULL THEN size END), 0) AS open_bytes,
           coalesce(sum(finished_at IS NULL AND held != 0), 0) AS held_n,
           coalesce(sum(CASE WHEN finished_at IS NULL AND held != 0 THEN size END), 0)
               AS held_bytes,
           coalesce(sum(finished_at IS NOT NULL), 0) AS done_n,
           coalesce(sum(CASE WHEN finished_at IS NOT NULL THEN size END), 0) AS done_bytes
    FROM messages
)
INSERT INTO queue_counts (kind, key, sub, n, bytes)
SELECT 'messages', 'open', '', open_n, open_bytes FROM t
UNION ALL SELECT 'messages', 'held', '', held_n, held_bytes FROM t
UNION ALL SELECT 'messages', 'finished', '', done_n, done_bytes FROM t;

-- Each trigger is one upsert of the rows it changes (one statement: a trigger costs
-- about 3 microseconds per statement it runs, and these run in intake's and delivery's
-- transactions: about 10 microseconds per message accepted and per status change).

CREATE TRIGGER recipients_count_insert AFTER INSERT ON recipients BEGIN
    INSERT INTO queue_counts (kind, key, sub, n)
    SELECT 'status', NEW.status, '', 1 WHERE true
    UNION ALL SELECT 'code', NEW.code, NEW.status, 1 WHERE NEW.code != ''
    UNION ALL SELECT 'domain', NEW.domain, '', 1 WHERE NEW.status = 'deferred'
    ON CONFLICT (kind, key, sub) DO UPDATE SET n = n + excluded.n;
END;

-- fires only when the status or the code really changes (a deferral with the same code
-- as the last one changes no count)
CREATE TRIGGER recipients_count_update AFTER UPDATE OF status, code ON recipients
WHEN OLD.status != NEW.status OR OLD.code != NEW.code BEGIN
    INSERT INTO queue_counts (kind, key, sub, n)
    SELECT 'status', OLD.status, '', -1 WHERE OLD.status != NEW.status
    UNION ALL SELECT 'status', NEW.status, '', 1 WHERE OLD.status != NEW.status
    UNION ALL SELECT 'code', OLD.code, OLD.status, -1 WHERE OLD.code != ''
    UNION ALL SELECT 'code', NEW.code, NEW.status, 1 WHERE NEW.code != ''
    UNION ALL SELECT 'domain', OLD.domain, '', -1
              WHERE OLD.status = 'deferred' AND NEW.status != 'deferred'
    UNION ALL SELECT 'domain', NEW.domain, '', 1
              WHERE NEW.status = 'deferred' AND OLD.status != 'deferred'
    ON CONFLICT (kind, key, sub) DO UPDATE SET n = n + excluded.n;
END;

-- also for the rows a message's delete cascades to
CREATE TRIGGER recipients_count_delete AFTER DELETE ON recipients BEGIN
    INSERT INTO queue_counts (kind, key, sub, n)
    SELECT 'status', OLD.status, '', -1 WHERE true
    UNION ALL SELECT 'code', OLD.code, OLD.status, -1 WHERE OLD.code != ''
    UNION ALL SELECT 'domain', OLD.domain, '', -1 WHERE OLD.status = 'deferred'
    ON CONFLICT (kind, key, sub) DO UPDATE SET n = n + excluded.n;
END;

CREATE TRIGGER messages_count_insert AFTER INSERT ON messages BEGIN
    INSERT INTO queue_counts (kind, key, sub, n, bytes)
    SELECT 'messages', CASE WHEN NEW.finished_at IS NULL THEN 'open' ELSE 'finished' END,
           '', 1, NEW.size WHERE true
    UNION ALL SELECT 'messages', 'held', '', 1, NEW.size
              WHERE NEW.held != 0 AND NEW.finished_at IS NULL
    ON CONFLICT (kind, key, sub) DO UPDATE SET n = n + excluded.n,
                                               bytes = bytes + excluded.bytes;
END;

CREATE TRIGGER messages_count_update AFTER UPDATE OF finished_at, held ON messages
WHEN (OLD.finished_at IS NULL) != (NEW.finished_at IS NULL) OR OLD.held != NEW.held BEGIN
    INSERT INTO queue_counts (kind, key, sub, n, bytes)
    SELECT 'messages', CASE WHEN OLD.finished_at IS NULL THEN 'open' ELSE 'finished' END,
           '', -1, -OLD.size
           WHERE (OLD.finished_at IS NULL) != (NEW.finished_at IS NULL)
    UNION ALL SELECT 'messages',
                     CASE WHEN NEW.finished_at IS NULL THEN 'open' ELSE 'finished' END,
                     '', 1, NEW.size
              WHERE (OLD.finished_at IS NULL) != (NEW.finished_at IS NULL)
    UNION ALL SELECT 'messages', 'held', '', -1, -OLD.size
              WHERE OLD.held != 0 AND OLD.finished_at IS NULL
    UNION ALL SELECT 'messages', 'held', '', 1, NEW.size
              WHERE NEW.held != 0 AND NEW.finished_at IS NULL
    ON CONFLICT (kind, key, sub) DO UPDATE SET n = n + excluded.n,
                                               bytes = bytes + excluded.bytes;
END;

CREATE TRIGGER messages_count_delete AFTER DELETE ON messages BEGIN
    INSERT INTO queue_counts (kind, key, sub, n, bytes)
    SELECT 'messages', CASE WHEN OLD.finished_at IS NULL THEN 'open' ELSE 'finished' END,
           '', -1, -OLD.size WHERE true
    UNION ALL SELECT 'messages', 'held', '', -1, -OLD.size
              WHERE OLD.held != 0 AND OLD.finished_at IS NULL
    ON CONFLICT (kind, key, sub) DO UPDATE SET n = n + excluded.n,
                                               bytes = bytes + excluded.bytes;
END;
