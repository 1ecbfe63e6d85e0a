-- Sums of call_history per 15 minutes (UTC) and queue ('' for calls that entered none), kept
-- by the history writer as it writes, so a report over a year reads tens of thousands of
-- rows instead of millions. Derived data: rebuilt from call_history when the report
-- thresholds it was computed with (history_meta 'rollup_thresholds') change.
CREATE TABLE call_rollup (
    bucket_ms               INTEGER NOT NULL,
    queue                   TEXT NOT NULL,
    calls                   INTEGER NOT NULL,
    answered_by_ivr         INTEGER NOT NULL,
    rejected                INTEGER NOT NULL,
    offered                 INTEGER NOT NULL,
    answered                INTEGER NOT NULL,
    callbacks_requested     INTEGER NOT NULL,
    unanswered              INTEGER NOT NULL,
    short_abandoned         INTEGER NOT NULL,
    answered_within_target  INTEGER NOT NULL,
    answered_wait_ms        INTEGER NOT NULL,
    handle_ms               INTEGER NOT NULL,
    longest_wait_ms         INTEGER NOT NULL,
    callbacks_completed     INTEGER NOT NULL,
    callbacks_unreached     INTEGER NOT NULL,
    emergency_redirects     INTEGER NOT NULL,
    tickets                 INTEGER NOT NULL,
    self_service            INTEGER NOT NULL,
    PRIMARY KEY (bucket_ms, queue)
) STRICT, WITHOUT ROWID;

CREATE TABLE call_rollup_services (
    bucket_ms  INTEGER NOT NULL,
    queue      TEXT NOT NULL,
    service    TEXT NOT NULL,
    tickets    INTEGER NOT NULL,
    PRIMARY KEY (bucket_ms, queue, service)
) STRICT, WITHOUT ROWID;

CREATE TABLE history_meta (
    key    TEXT PRIMARY KEY,
    value  TEXT NOT NULL
) STRICT;
