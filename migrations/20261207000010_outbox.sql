-- Tickets leave the box: the city's CRM (Open311 GeoReport v2) and webhooks are fed from a
-- durable outbox written in the same transaction as the change it announces, so what a
-- caller was told is never lost and never waits for the other system.

-- The CRM's own number for a forwarded ticket (its service_request_id), and the token it
-- answered with instead when it files requests later (resolved with GET tokens/{token}).
ALTER TABLE tickets ADD COLUMN external_id TEXT;
ALTER TABLE tickets ADD COLUMN external_token TEXT;

CREATE TABLE outbox (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    -- 'open311': POST requests to forward.open311 for ticket_id (the form is built at
    -- delivery, from the ticket and the service_map then in force); 'webhook': POST of body
    -- to target.
    kind       TEXT NOT NULL CHECK (kind IN ('open311', 'webhook')),
    -- The webhook's URL; NULL for 'open311'.
    target     TEXT,
    ticket_id  INTEGER,
    -- 'request.created', 'request.updated', 'emergency.redirected', 'call.ended'.
    event      TEXT NOT NULL,
    -- The JSON body of a webhook (frozen when the event happened); NULL for 'open311'.
    body       TEXT,
    -- 'pending' (waiting for next_ms), 'in_flight' (being sent now), 'done', 'dead' (given
    -- up: last_error says why; an admin may send it again).
    state      TEXT NOT NULL CHECK (state IN ('pending', 'in_flight', 'done', 'dead')),
    attempts   INTEGER NOT NULL DEFAULT 0,
    -- Unix epoch milliseconds.
    created_ms INTEGER NOT NULL,
    next_ms    INTEGER NOT NULL,
    done_ms    INTEGER,
    last_error TEXT
) STRICT;

CREATE INDEX outbox_due ON outbox (state, next_ms);
-- One CRM request per ticket, ever.
CREATE UNIQUE INDEX outbox_one_crm_request_per_ticket ON outbox (ticket_id) WHERE kind = 'open311';
CREATE INDEX tickets_external_id ON tickets (external_id) WHERE external_id IS NOT NULL;
