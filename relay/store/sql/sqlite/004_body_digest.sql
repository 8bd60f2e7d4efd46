-- dane-relay schema version 4: a digest of every body, checked before delivery, and the
-- reason a message is held (issue 10).
-- `quick_check` at start-up finds damaged pages, not a changed byte inside a body: the
-- SHA-256 of the body as accepted, written in the same transaction as the body, is
-- compared with the body read back before every delivery attempt. A mismatch holds the
-- message (held = 1, held_reason says why) instead of sending altered mail.

ALTER TABLE messages ADD COLUMN body_sha256 BLOB;  -- NULL: accepted before version 4
ALTER TABLE messages ADD COLUMN held_reason TEXT NOT NULL DEFAULT '';
