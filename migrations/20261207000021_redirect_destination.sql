-- Where a redirect went: NULL for 911, else the name of the `transfers` entry (a crisis or
-- utility line such as the 988 lifeline) that a menu's `transfer` action sent the caller to.
-- These go through the same fallback and the same append-only audit as 911.
ALTER TABLE emergency_redirects ADD COLUMN destination TEXT;

DROP TRIGGER emergency_redirects_only_outcome_changes;

CREATE TRIGGER emergency_redirects_only_outcome_changes
BEFORE UPDATE OF id, at, caller, call_id, menu_path, reason, method, caller_verified,
    operator, requested_via, destination
ON emergency_redirects
BEGIN
    SELECT RAISE(ABORT, 'emergency_redirects: only outcome may change');
END;
