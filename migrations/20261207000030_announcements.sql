-- Emergency announcements set by admins (POST /admin/announcements): heard by every caller
-- right after the 911 screening between starts_at and ends_at (or ended_at, when an admin
-- ends one early), with temporary main-menu keys. Datetimes are RFC 3339 UTC.
CREATE TABLE announcements (
    id         INTEGER PRIMARY KEY,
    created_at TEXT NOT NULL,
    -- Who set it: the admin token's name ("admin" for the single token).
    created_by TEXT NOT NULL,
    starts_at  TEXT NOT NULL,
    ends_at    TEXT NOT NULL CHECK (ends_at > starts_at),
    ended_at   TEXT,
    ended_by   TEXT,
    -- The validated request (messages per language, with any WAV as base64; temporary
    -- entries), as JSON.
    spec       TEXT NOT NULL
) STRICT;

CREATE INDEX announcements_ends_at ON announcements (ends_at);
