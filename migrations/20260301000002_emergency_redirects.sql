-- Audit of every call sent away from the 311 menu to emergency services.
-- Append-only: rows are never deleted, and only `outcome` may change
-- ('started' before the transfer, then 'connected', 'failed:<why>' or 'announced').
CREATE TABLE emergency_redirects (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    at        TEXT NOT NULL,
    caller    TEXT,
    call_id   TEXT NOT NULL,
    menu_path TEXT NOT NULL,
    reason    TEXT,
    method    TEXT NOT NULL,
    outcome   TEXT NOT NULL
) STRICT;

CREATE INDEX emergency_redirects_at ON emergency_redirects (at);

CREATE TRIGGER emergency_redirects_no_delete
BEFORE DELETE ON emergency_redirects
BEGIN
    SELECT RAISE(ABORT, 'emergency_redirects is an append-only audit');
END;

CREATE TRIGGER emergency_redirects_only_outcome_changes
BEFORE UPDATE OF id, at, caller, call_id, menu_path, reason, method ON emergency_redirects
BEGIN
    SELECT RAISE(ABORT, 'emergency_redirects: only outcome may change');
END;
