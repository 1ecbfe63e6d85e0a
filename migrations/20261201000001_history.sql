-- Call history for reports: one row per call, operators' states, and queue events as
-- Asterisk's queue_log records them. Times are Unix epoch milliseconds (UTC), so reports
-- bucket and subtract them with integer arithmetic. Rows older than history.keep_days are
-- deleted daily; callers' numbers are replaced by a keyed hash after
-- history.hash_numbers_after_days.

CREATE TABLE call_history (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    call_id             TEXT NOT NULL,
    -- The INVITE arrived.
    started_ms          INTEGER NOT NULL,
    -- We answered (200 OK); NULL for a call refused or given up while ringing.
    answered_ms         INTEGER,
    ended_ms            INTEGER NOT NULL,
    -- The caller's number as received, or 'h:<hex>' once hashed.
    caller              TEXT,
    -- 1 when a trusted trunk asserted the number.
    caller_verified     INTEGER NOT NULL DEFAULT 0 CHECK (caller_verified IN (0, 1)),
    dialled             TEXT,
    language            TEXT,
    menu_path           TEXT,
    outcome             TEXT NOT NULL CHECK (outcome IN
        ('ticket', 'info', 'emergency', 'bridged', 'abandoned', 'callback', 'rejected')),
    -- Who or what ended the call (EndReason).
    end_reason          TEXT,
    ticket_id           INTEGER,
    ticket_service      TEXT,
    emergency_audit_id  INTEGER,
    -- The operator queue, if the caller entered one.
    queue               TEXT,
    queue_entered_ms    INTEGER,
    -- Time in the queue until an operator answered or the caller left it.
    wait_ms             INTEGER,
    agent               TEXT,
    talk_ms             INTEGER,
    wrap_up_ms          INTEGER,
    transferred_to      TEXT,
    -- Where an abandoned call was left: 'ringing' (before our answer), 'menu', 'queue'.
    abandoned_in        TEXT CHECK (abandoned_in IN ('ringing', 'menu', 'queue')),
    abandoned_after_ms  INTEGER,
    callback_attempts   INTEGER,
    -- 'pending' (until the call-back ends), 'served' (an operator talked to the caller),
    -- 'answered' (the caller answered, no operator took it), 'unreached', 'stopped'.
    callback_result     TEXT,
    rejected_code       INTEGER,
    rejected_why        TEXT,
    number_hashed       INTEGER NOT NULL DEFAULT 0 CHECK (number_hashed IN (0, 1))
) STRICT;

CREATE INDEX call_history_started ON call_history (started_ms);
CREATE INDEX call_history_call_id ON call_history (call_id);
CREATE INDEX call_history_unhashed ON call_history (started_ms) WHERE number_hashed = 0;

-- One row per span of time an operator spent in one state.
CREATE TABLE agent_states (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    agent       TEXT NOT NULL,
    -- 'logged_out', 'available', 'ringing', 'on_call', 'wrap_up', 'no_answer_pause', 'paused'.
    state       TEXT NOT NULL,
    -- Why, for 'paused' (not ready).
    reason      TEXT,
    started_ms  INTEGER NOT NULL,
    ended_ms    INTEGER NOT NULL
) STRICT;

CREATE INDEX agent_states_started ON agent_states (started_ms);

-- Queue events, as Asterisk's queue_log: ENTERQUEUE, RINGNOANSWER/offer, CONNECT, ABANDON,
-- transfer, COMPLETECALLER/COMPLETEAGENT.
CREATE TABLE queue_events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms       INTEGER NOT NULL,
    -- The call's SIP Call-ID when known.
    call_id     TEXT,
    queue       TEXT NOT NULL,
    agent       TEXT,
    event       TEXT NOT NULL CHECK (event IN
        ('enter', 'offer', 'answer', 'abandon', 'transfer', 'complete',
         'callback_requested', 'callback_unreached')),
    -- enter: position; answer/abandon: wait; complete: talk time.
    wait_ms     INTEGER,
    talk_ms     INTEGER,
    position    INTEGER
) STRICT;

CREATE INDEX queue_events_at ON queue_events (at_ms);

-- The key callers' numbers are hashed with (random, per database): a hash without it cannot
-- be reversed by trying every phone number.
CREATE TABLE history_key (
    id  INTEGER PRIMARY KEY CHECK (id = 1),
    key BLOB NOT NULL
) STRICT;
