-- The event log: Tally's single source of truth. Append-only, ordered, tamper-evident.

CREATE TABLE events (
    -- Global position. Identity values are handed out at INSERT time but become visible at
    -- COMMIT time, so positions commit out of order: never read "position > last" alone.
    position       bigint      GENERATED ALWAYS AS IDENTITY,
    -- The writing transaction. Readers follow (tx_id, position) and only below
    -- pg_snapshot_xmin(pg_current_snapshot()), which is what makes reading gap-safe.
    tx_id          xid8        NOT NULL DEFAULT pg_current_xact_id(),
    stream_type    text        NOT NULL,
    stream_id      uuid        NOT NULL,
    version        bigint      NOT NULL CHECK (version > 0),
    event_id       uuid        NOT NULL,
    event_type     text        NOT NULL,
    schema_version integer     NOT NULL CHECK (schema_version > 0),
    -- `json`, not `jsonb`: the exact bytes written are kept, because the hash covers them.
    payload        json        NOT NULL,
    metadata       json        NOT NULL,
    recorded_at    timestamptz NOT NULL,
    prev_hash      bytea       CHECK (prev_hash IS NULL OR length(prev_hash) = 32),
    hash           bytea       NOT NULL CHECK (length(hash) = 32),
    -- Optimistic concurrency: two writers cannot both append version N of a stream.
    PRIMARY KEY (stream_id, version),
    CONSTRAINT events_event_id_unique UNIQUE (event_id),
    -- The first event of a stream has no predecessor; every other one names it.
    CONSTRAINT events_chain_start CHECK ((version = 1) = (prev_hash IS NULL))
);

-- The commit-order read path (relay, audit feed, rebuilds).
CREATE UNIQUE INDEX events_commit_order ON events (tx_id, position);
-- Point lookups by position (audit, projector gap fill).
CREATE UNIQUE INDEX events_position ON events (position);

-- Events are facts: the database itself refuses to change or remove them, whatever the
-- application code does. (A superuser can still disable the trigger; the hash chain and
-- `tally audit verify` are what catch that.)
CREATE FUNCTION events_are_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'events are append-only: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

CREATE TRIGGER events_no_update_or_delete
    BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION events_are_append_only();

CREATE TRIGGER events_no_truncate
    BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_are_append_only();

-- The relay's place in the log: the last (tx_id, position) whose publish JetStream acked.
CREATE TABLE relay_checkpoints (
    name       text        PRIMARY KEY,
    tx_id      bigint      NOT NULL,
    position   bigint      NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
