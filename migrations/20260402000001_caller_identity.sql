-- Whether the caller's number on an emergency audit row was asserted by a trusted trunk
-- (P-Asserted-Identity from a source in trunks.allow: 1) or only claimed (From, which
-- anyone can set: 0). NULL on rows written before this column existed.
ALTER TABLE emergency_redirects
    ADD COLUMN caller_verified INTEGER CHECK (caller_verified IN (0, 1));

DROP TRIGGER emergency_redirects_only_outcome_changes;

CREATE TRIGGER emergency_redirects_only_outcome_changes
BEFORE UPDATE OF id, at, caller, call_id, menu_path, reason, method, caller_verified
ON emergency_redirects
BEGIN
    SELECT RAISE(ABORT, 'emergency_redirects: only outcome may change');
END;

-- Call-backs taken, per number, for callback.per_number_per_day (a rolling 24 hours).
-- Personal data kept no longer than it counts: rows older than a day are deleted whenever
-- a new call-back is taken.
CREATE TABLE callback_requests (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    -- The caller's number, E.164.
    number  TEXT NOT NULL,
    -- ISO 8601 UTC, whole seconds.
    at      TEXT NOT NULL,
    call_id TEXT
) STRICT;

CREATE INDEX callback_requests_number_at ON callback_requests (number, at);
