-- Transfers: who sent a caller to 911 when an operator did (the menu's own redirects leave
-- these NULL), and the call's record of every transfer its operator made.

-- The operator's agent id, and how they asked: 'refer' (their phone's transfer key),
-- 'phone_call' (they dialled 911 from their phone) or 'admin' (the admin API).
ALTER TABLE emergency_redirects ADD COLUMN operator TEXT;
ALTER TABLE emergency_redirects ADD COLUMN requested_via TEXT;

DROP TRIGGER emergency_redirects_only_outcome_changes;

CREATE TRIGGER emergency_redirects_only_outcome_changes
BEFORE UPDATE OF id, at, caller, call_id, menu_path, reason, method, caller_verified,
    operator, requested_via
ON emergency_redirects
BEGIN
    SELECT RAISE(ABORT, 'emergency_redirects: only outcome may change');
END;

-- One row per transfer an operator (or an admin) asked for: written when it starts, its
-- outcome when it ends ('connected', 'returned to operator: <why>', 'requeued: <why>'...).
CREATE TABLE transfers (
    id            INTEGER PRIMARY KEY,
    at            TEXT NOT NULL,
    call_id       TEXT NOT NULL,
    operator      TEXT,
    -- '911', a transfers entry's name, 'agent:<id>' or 'queue:<name>'.
    target        TEXT NOT NULL,
    requested_via TEXT NOT NULL,
    outcome       TEXT NOT NULL,
    ended_at      TEXT
) STRICT;

CREATE INDEX transfers_call_id ON transfers (call_id);

-- The transfer that took the caller who filed a ticket on to someone else (the target,
-- the operator and how), as the call's tickets record it. Private: not in Open311 output.
ALTER TABLE tickets ADD COLUMN transfer TEXT;
