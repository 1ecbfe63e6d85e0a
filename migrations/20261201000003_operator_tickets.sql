-- Tickets an operator files from the console: channel 'operator', and the operator's agent id.
-- SQLite cannot change a CHECK constraint in place, so the table is rebuilt with the same
-- columns (and `recording` and `transfer`, added earlier) plus `agent_id`.
CREATE TABLE tickets_new (
    service_request_id INTEGER PRIMARY KEY
        CHECK (service_request_id BETWEEN 10000000 AND 99999999),
    service_code       TEXT NOT NULL,
    service_name       TEXT NOT NULL,
    status             TEXT NOT NULL CHECK (status IN ('open', 'closed')),
    status_notes       TEXT,
    description        TEXT,
    agency_responsible TEXT,
    service_notice     TEXT,
    requested_datetime TEXT NOT NULL,
    updated_datetime   TEXT NOT NULL,
    expected_datetime  TEXT,
    zipcode            TEXT,
    address            TEXT,
    address_id         TEXT,
    lat                REAL,
    long               REAL,
    phone              TEXT,
    email              TEXT,
    first_name         TEXT,
    last_name          TEXT,
    media_url          TEXT,
    channel            TEXT NOT NULL CHECK (channel IN ('phone', 'web', 'operator')),
    language           TEXT,
    call_id            TEXT,
    callback_requested INTEGER NOT NULL DEFAULT 0 CHECK (callback_requested IN (0, 1)),
    recording          TEXT,
    -- The transfer that took the call that filed it on (staff only).
    transfer           TEXT,
    -- The operator who filed it (channel 'operator').
    agent_id           TEXT
) STRICT;

INSERT INTO tickets_new (service_request_id, service_code, service_name, status, status_notes,
    description, agency_responsible, service_notice, requested_datetime, updated_datetime,
    expected_datetime, zipcode, address, address_id, lat, long, phone, email, first_name,
    last_name, media_url, channel, language, call_id, callback_requested, recording, transfer)
SELECT service_request_id, service_code, service_name, status, status_notes,
    description, agency_responsible, service_notice, requested_datetime, updated_datetime,
    expected_datetime, zipcode, address, address_id, lat, long, phone, email, first_name,
    last_name, media_url, channel, language, call_id, callback_requested, recording, transfer
FROM tickets;

DROP TABLE tickets;
ALTER TABLE tickets_new RENAME TO tickets;

CREATE INDEX tickets_requested_datetime ON tickets (requested_datetime);
CREATE INDEX tickets_service_code ON tickets (service_code);
CREATE INDEX tickets_status ON tickets (status);
-- A caller's earlier requests, for the operator's screen.
CREATE INDEX tickets_phone ON tickets (phone, requested_datetime);
