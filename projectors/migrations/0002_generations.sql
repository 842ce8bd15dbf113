-- Projections become rebuildable: each read model's rows live in a generation table
-- (`<model>_g<N>`, created by the projector code from its own DDL) and readers use a view of the
-- model's name that points at the live generation. A rebuild fills generation N+1 from the log
-- and swaps the view in one transaction, so a reader never sees a half-built model.
-- The first live generation is created by the code (`tally migrate`, or any projector start);
-- the read models of 0001 are rebuilt from the log.
DROP TABLE account_balances;
DROP TABLE projection_checkpoints;

-- One row per projection: which generation readers see and which shape of the code built it.
CREATE TABLE projections (
    name        text        PRIMARY KEY,
    -- Readers' generation; NULL until the first one exists.
    generation  integer,
    -- The projection code's table shape that built `generation`; workers whose code has
    -- another shape leave it alone until it is rebuilt.
    shape       integer,
    -- A generation being built by a rebuild (its tables exist), else NULL.
    building    integer,
    paused      boolean     NOT NULL DEFAULT false,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- One row per (projection, partition): the lease of the worker that consumes it, where it
-- stands, and what went wrong. The checkpoint columns change in the transaction that changes
-- the read-model rows they cover.
CREATE TABLE projection_partitions (
    projection      text        NOT NULL REFERENCES projections (name),
    partition       integer     NOT NULL,
    worker          text,
    lease_until     timestamptz,
    -- running | retrying (a dependency is failing) | failed (stopped at a poison event)
    -- | needs-rebuild (live generation built by another code shape)
    state           text        NOT NULL DEFAULT 'running',
    last_error      text,
    last_error_at   timestamptz,
    stream_sequence bigint      NOT NULL DEFAULT 0,
    position        bigint      NOT NULL DEFAULT 0,
    -- Messages still waiting in the partition's consumer after the last batch.
    lag_events      bigint      NOT NULL DEFAULT 0,
    -- `recorded_at` of the last applied event.
    last_event_at   timestamptz,
    applied         bigint      NOT NULL DEFAULT 0,
    duplicates      bigint      NOT NULL DEFAULT 0,
    dead_letters    bigint      NOT NULL DEFAULT 0,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (projection, partition)
);

-- Projector processes alive: a worker that stops beating loses its leases to the others.
CREATE TABLE projector_workers (
    worker_id    text        PRIMARY KEY,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now()
);
