-- Service requests (Open311 GeoReport v2 "service requests") filed by phone or web.
-- Datetimes are ISO 8601 UTC with whole seconds ('2026-11-26T03:22:09Z'), so text
-- order is time order and range filters compare strings.
CREATE TABLE tickets (
    -- 8 digits, random, never starting with 0: easy to key in on a phone.
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
    channel            TEXT NOT NULL CHECK (channel IN ('phone', 'web')),
    language           TEXT,
    call_id            TEXT,
    callback_requested INTEGER NOT NULL DEFAULT 0 CHECK (callback_requested IN (0, 1))
) STRICT;

CREATE INDEX tickets_requested_datetime ON tickets (requested_datetime);
CREATE INDEX tickets_service_code ON tickets (service_code);
CREATE INDEX tickets_status ON tickets (status);
