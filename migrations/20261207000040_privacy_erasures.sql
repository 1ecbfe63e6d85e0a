-- Erasures of a resident's number (`ivr311 privacy erase`): when, who ran it, what was
-- removed (counts, JSON), and a keyed hash of the number (with the history key, so only this
-- database can say whether a given number was erased); never the number itself.
CREATE TABLE privacy_erasures (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    at          TEXT NOT NULL,
    by_whom     TEXT NOT NULL,
    number_hash TEXT NOT NULL,
    counts      TEXT NOT NULL
) STRICT;
