-- Read models. Written only by the projectors; read by the query API (through replicas).

-- One row per account. `version` is the stream version the row reflects: an event at or
-- below it is a duplicate and is dropped, which is what makes redelivery harmless.
CREATE TABLE account_balances (
    account_id    uuid        PRIMARY KEY,
    owner         text        NOT NULL,
    currency      text        NOT NULL,
    balance       bigint      NOT NULL,
    held          bigint      NOT NULL DEFAULT 0,
    status        text        NOT NULL,
    version       bigint      NOT NULL,
    last_position bigint      NOT NULL,
    updated_at    timestamptz NOT NULL
);

-- Where each (projection, partition) stands. Updated in the same transaction as the rows it
-- covers, so a crash can never leave the two disagreeing.
CREATE TABLE projection_checkpoints (
    projection      text        NOT NULL,
    partition       integer     NOT NULL,
    stream_sequence bigint      NOT NULL,
    position        bigint      NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (projection, partition)
);
