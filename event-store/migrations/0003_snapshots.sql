-- Snapshots: the folded state of a long stream at some version, so a writer that has not got
-- the stream in memory reads the snapshot plus the events after it instead of the whole
-- history. A snapshot is a cache, not a record: it may be deleted at any time (the log stays
-- the truth), which is why this table, unlike `events`, is not append-only.
CREATE TABLE snapshots (
    stream_id     uuid        PRIMARY KEY,
    stream_type   text        NOT NULL,
    -- The stream version the state reflects (every event up to and including it).
    version       bigint      NOT NULL CHECK (version > 0),
    -- The shape of `state`; a reader that knows another shape ignores the row and replays.
    state_version integer     NOT NULL,
    state         jsonb       NOT NULL,
    taken_at      timestamptz NOT NULL DEFAULT now()
);
