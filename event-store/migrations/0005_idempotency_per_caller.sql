-- Idempotency keys belong to their caller (the token subject that sent them): two clients
-- using the same key are two requests, each with its own effect, and neither can replay or
-- block the other's. Before this, one key was shared by every caller.
ALTER TABLE idempotency_keys ADD COLUMN caller text NOT NULL DEFAULT '';

-- Keys stored before keep working for whoever sent them: a key that wrote events takes the
-- actor those events recorded (the metadata of every event names its caller and key). A key
-- that wrote none (a stored refusal), or whose events named no actor, keeps the empty caller,
-- which the command API still matches for every caller, as it did when the key was stored.
-- This reads the log once; it is not rewritten.
UPDATE idempotency_keys AS k
SET caller = e.actor
FROM (
    SELECT DISTINCT ON (metadata ->> 'idempotency_key')
        metadata ->> 'idempotency_key' AS key,
        metadata ->> 'actor' AS actor
    FROM events
    WHERE metadata ->> 'idempotency_key' IS NOT NULL
      AND coalesce(metadata ->> 'actor', '') <> ''
    ORDER BY metadata ->> 'idempotency_key', position
) AS e
WHERE e.key = k.key;

-- The key first: every lookup names its key, and the legacy match (caller '') is a probe of
-- the same index.
ALTER TABLE idempotency_keys DROP CONSTRAINT idempotency_keys_pkey;
ALTER TABLE idempotency_keys ADD PRIMARY KEY (key, caller);
ALTER TABLE idempotency_keys ALTER COLUMN caller DROP DEFAULT;
ALTER TABLE idempotency_keys ADD CONSTRAINT idempotency_keys_caller_length CHECK (length(caller) <= 1024);
