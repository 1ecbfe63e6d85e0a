-- Callers who reported a problem already reported (same service, same ZIP code, still open)
-- and chose to add themselves to it instead of filing a new request. Shown in Open311 as the
-- `duplicates` extension field.
ALTER TABLE tickets ADD COLUMN duplicates INTEGER NOT NULL DEFAULT 0 CHECK (duplicates >= 0);

-- The open-request lookups: a caller's by number, a duplicate's by service and ZIP code.
CREATE INDEX IF NOT EXISTS tickets_phone_status ON tickets (phone, status);
CREATE INDEX IF NOT EXISTS tickets_duplicate_lookup ON tickets (service_code, zipcode, status);
