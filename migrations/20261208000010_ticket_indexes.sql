-- Indexes for a store that holds a city's years (BENCHMARKS.md, "A store with ten million
-- tickets"). Every ticket query ends "ORDER BY requested_datetime DESC, service_request_id
-- DESC LIMIT n": an index whose last column is requested_datetime (the row's number follows
-- in every index) hands the rows over in that order, so a query reads n rows, not every
-- match of its filter and a sort.

-- Open311 GET requests.json?service_code=... (with or without status and dates).
CREATE INDEX tickets_code_requested ON tickets (service_code, requested_datetime);
-- ... and with a status too.
CREATE INDEX tickets_code_status_requested ON tickets (service_code, status, requested_datetime);
-- Open311 GET requests.json?status=...
CREATE INDEX tickets_status_requested ON tickets (status, requested_datetime);
-- The caller's open request (the menu's repeat-caller lookup), and a caller's earlier
-- requests for the operator's screen (their few rows sorted).
CREATE INDEX tickets_phone_status_requested ON tickets (phone, status, requested_datetime);
-- A report of the same problem: open, same service and ZIP code, recent.
CREATE INDEX tickets_duplicate_requested
    ON tickets (service_code, zipcode, status, requested_datetime);
-- The open-data figures: requests closed in a period.
CREATE INDEX tickets_status_updated ON tickets (status, updated_datetime);
-- The retention pass: recordings still kept, and callers' numbers not yet removed, by age.
-- Partial: only the rows the pass still has work on, so it never walks the years it already
-- did.
CREATE INDEX tickets_recording_requested ON tickets (requested_datetime)
    WHERE recording IS NOT NULL;
CREATE INDEX tickets_number_requested ON tickets (requested_datetime)
    WHERE phone IS NOT NULL AND phone <> 'erased';
-- Forwarding to the city's CRM: open forwarded tickets in number order, and tokens still to
-- resolve. Partial: only forwarded tickets.
CREATE INDEX tickets_crm_open ON tickets (status) WHERE external_id IS NOT NULL;
CREATE INDEX tickets_crm_tokens ON tickets (external_token)
    WHERE external_token IS NOT NULL AND external_id IS NULL;

-- Replaced by the ones above (each begins with the same columns; a caller's own rows are
-- few, so tickets_phone's order is not needed): each index costs every filing and status
-- change a write, and at ten million tickets a few hundred megabytes.
DROP INDEX IF EXISTS tickets_service_code;
DROP INDEX IF EXISTS tickets_status;
DROP INDEX IF EXISTS tickets_phone;
DROP INDEX IF EXISTS tickets_phone_status;
DROP INDEX IF EXISTS tickets_duplicate_lookup;
