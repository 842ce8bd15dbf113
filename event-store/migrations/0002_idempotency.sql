-- Idempotency records. A record is written in the same transaction as the events of the
-- command it belongs to, so after any crash either both exist or neither does: a retried
-- command finds its first response, or finds nothing because nothing happened.
CREATE TABLE idempotency_keys (
    -- The client's Idempotency-Key (scoped per client once authentication exists).
    key             text        PRIMARY KEY CHECK (length(key) BETWEEN 1 AND 255),
    -- SHA-256 of the request (method, path, canonical body): the same key with another
    -- request is refused instead of silently answered with the first response.
    request_hash    bytea       NOT NULL CHECK (length(request_hash) = 32),
    response_status smallint    NOT NULL,
    response_body   json        NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);

-- Retention pruning (off by default: keys are kept forever).
CREATE INDEX idempotency_keys_created_at ON idempotency_keys (created_at);
